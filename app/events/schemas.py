"""Bodies of the publish endpoints, validated after orjson has parsed the raw body.

The raw body is parsed with orjson rather than FastAPI's stdlib parser
because the stdlib accepts ``NaN`` and ``Infinity``, which are not JSON and
which we could not store faithfully.

The answers are written as bytes (``StoredEvent.to_json``); ``EventOut`` and
the pages only document them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

EVENT_TYPE_PATTERN = r"^[A-Za-z0-9.:_-]{1,64}$"
RESERVED_PREFIX = "ssehub."
MAX_BATCH = 1000


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(default="message", pattern=EVENT_TYPE_PATTERN, examples=["message"])
    data: Any = Field(examples=[{"text": "hi"}])

    @field_validator("type")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.startswith(RESERVED_PREFIX):
            raise ValueError(f"types beginning with {RESERVED_PREFIX!r} are reserved for ssehub")
        return value


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[EventIn] = Field(min_length=1, max_length=MAX_BATCH)


class EventOut(BaseModel):
    id: int = Field(gt=0)
    channel: str
    type: str
    data: Any
    published_at: datetime


class BatchOut(BaseModel):
    events: list[EventOut]


class EventPage(BaseModel):
    events: list[EventOut]
    next_after: int | None
