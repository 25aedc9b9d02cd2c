"""Request and response bodies of channels, members and subscriptions."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from app.text import Text

CHANNEL_NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$"


# The columns are Postgres integers: a larger bound would fail the insert (a 500).
Bound = Annotated[int, Field(gt=0, le=2_147_483_647)]


class ChannelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=CHANNEL_NAME_PATTERN, examples=["news"])
    description: Text = Field(default="", max_length=1000)
    private: bool = False
    presence: bool = False
    max_events: Bound | None = None
    max_age_seconds: Bound | None = None


class ChannelPatch(BaseModel):
    """Only the fields present are changed; ``null`` clears a bound."""

    model_config = ConfigDict(extra="forbid")

    description: Text | None = Field(default=None, max_length=1000)
    private: bool | None = None
    presence: bool | None = None
    max_events: Bound | None = None
    max_age_seconds: Bound | None = None


class ChannelOut(BaseModel):
    name: str
    description: str
    private: bool
    presence: bool
    max_events: int | None
    max_age_seconds: int | None
    created_at: datetime
    last_event_id: int | None


class PresentOut(BaseModel):
    username: str
    streams: int  # open streams carrying the channel, on every instance
    since: datetime  # when the first of them opened


class PresenceOut(BaseModel):
    channel: str
    users: list[PresentOut]  # in username order


class MemberOut(BaseModel):
    username: str
    created_at: datetime


class SubscriptionOut(BaseModel):
    channel: str
    created_at: datetime
