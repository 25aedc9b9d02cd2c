"""Request and response bodies of the auth endpoints."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.auth.external import reserved_for_external

USERNAME_PATTERN = r"^[A-Za-z0-9_.\-]{3,64}$"


class RegisterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(pattern=USERNAME_PATTERN, examples=["alice"])
    password: str = Field(min_length=8, max_length=256, examples=["correct horse battery"])

    @field_validator("username")
    @classmethod
    def _not_an_external_users_name(cls, username: str) -> str:
        """Names ending in ``-`` and 8 hex digits are the identity provider's users'
        (``app.auth.external.username_for``): registering one first would lock
        that user out."""
        if reserved_for_external(username):
            raise ValueError(
                "names ending in '-' and 8 hex digits are kept for your identity provider's users"
            )
        return username


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    username: str
    is_admin: bool
    created_at: datetime


class TokenOut(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int


class StreamTokenOut(BaseModel):
    stream_token: str
    expires_in: int
