"""``/api-keys`` (admin): credentials for backend publishers (``app.auth.api_keys``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from app.auth import api_keys
from app.auth.deps import AdminUser
from app.db import SessionDep
from app.text import Text

router = APIRouter(tags=["api keys"])
# A channel name or ``@USERNAME``, in which ``*`` stands for any run of characters.
PATTERN = r"^[A-Za-z0-9._@*\-]{1,66}$"
Pattern = Annotated[str, Field(pattern=PATTERN, examples=["orders.*"])]


class ApiKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(min_length=1, max_length=100, examples=["orders-service"])
    publish: list[Pattern] = Field(min_length=1, max_length=100, examples=[["orders.*", "news"]])


class ApiKeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    publish: list[str]
    created_at: datetime
    last_used_at: datetime | None


class NewApiKeyOut(BaseModel):
    id: int
    name: str
    publish: list[str]
    created_at: datetime
    key: str = Field(description="Shown only here: only a hash of it is kept")


@router.post("/api-keys", status_code=201, response_model=NewApiKeyOut)
async def create_api_key(body: ApiKeyIn, session: SessionDep, _: AdminUser) -> NewApiKeyOut:
    """A new key that may publish and read history where its patterns match (admin)."""
    row, key = await api_keys.create_key(session, body.name, body.publish)
    return NewApiKeyOut(
        id=row.id, name=row.name, publish=row.publish, created_at=row.created_at, key=key
    )


@router.get("/api-keys", response_model=list[ApiKeyOut])
async def list_api_keys(session: SessionDep, _: AdminUser) -> list[ApiKeyOut]:
    """Every key, without the key itself (admin)."""
    return [ApiKeyOut.model_validate(row) for row in await api_keys.list_keys(session)]


@router.delete("/api-keys/{key_id}", status_code=204)
async def delete_api_key(
    key_id: Annotated[int, Path(ge=1, le=2**63 - 1)], session: SessionDep, _: AdminUser
) -> Response:
    """Revoke a key (admin): every instance refuses it within a second."""
    await api_keys.delete_key(session, key_id)
    return Response(status_code=204)
