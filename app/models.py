"""Tables. Migrations in ``migrations/versions`` create exactly these.

Events keep ``data`` as the compact JSON text the publisher sent, so a frame
can be built by splicing strings, without decoding and re-encoding.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import UserDefinedType


class XID8(UserDefinedType[int]):
    """Postgres's 64-bit transaction id type (only the migration creates the column)."""

    cache_ok = True

    def get_col_spec(self, **_: object) -> str:
        return "xid8"


class Base(DeclarativeBase):
    """Every table with its schema: ssehub's sessions do not search ``public``
    (``app.db.SEARCH_PATH``), so every name in the SQL the ORM writes is
    ``public.``-qualified, and so are the foreign keys' targets."""

    metadata = MetaData(
        schema="public",
        # The indexes' names as before the schema was named (the default
        # convention would put it in them): the migrations created these.
        naming_convention={"ix": "ix_%(table_name)s_%(column_0_name)s"},
    )


class User(Base):
    __tablename__ = "users"
    __table_args__ = (Index("uq_users_external_subject", "external_subject", unique=True),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str | None] = mapped_column(Text)  # None: an external user
    # The identity provider's name for a user created from its token (app.auth.external).
    external_subject: Mapped[str | None] = mapped_column(Text)
    is_admin: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Channel(Base):
    __tablename__ = "channels"
    __table_args__ = (Index("uq_channels_owner_id", "owner_id", unique=True),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(65), unique=True)  # "@" + a username: personal
    description: Mapped[str] = mapped_column(Text, server_default="")
    private: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # Who is online in it is kept (app.realtime.presence).
    presence: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    max_events: Mapped[int | None] = mapped_column(Integer)
    max_age_seconds: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Every event of this channel with an id at or below this has been removed
    # by retention; a stream that had not delivered them gets ``ssehub.truncated``.
    pruned_through: Mapped[int] = mapped_column(BigInteger, server_default=text("0"), index=True)
    # The user of a personal channel ``@USERNAME``: it lives and dies with them.
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))


class ChannelMember(Base):
    __tablename__ = "channel_members"

    channel_id: Mapped[int] = mapped_column(
        ForeignKey("channels.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Subscription(Base):
    __tablename__ = "subscriptions"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    channel_id: Mapped[int] = mapped_column(
        ForeignKey("channels.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        # "events of these channels after id N", in id order: replay and history.
        Index("ix_events_channel_id_id", "channel_id", "id"),
        # Retention by age.
        Index("ix_events_published_at", "published_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    # No foreign key (its trigger ran per event): publishing locks the channel's row
    # instead, and a trigger on channels deletes a deleted channel's events
    # (migration 0004).
    channel_id: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[str] = mapped_column(String(64))
    data: Mapped[str] = mapped_column(Text)  # compact JSON text, spliced into frames as is
    published_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.clock_timestamp()
    )


class IdempotencyKey(Base):
    """A used ``Idempotency-Key`` and a copy of the events it answers with: one
    for a single publish or an enqueue, a batch's all (their ids follow
    ``event_id``, the first's).

    Kept apart from the events so that it lives its 24 hours even when retention
    deletes them sooner (``app.events.retention``)."""

    __tablename__ = "idempotency_keys"

    channel_id: Mapped[int] = mapped_column(
        ForeignKey("channels.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    event_id: Mapped[int] = mapped_column(BigInteger)
    types: Mapped[list[str]] = mapped_column(ARRAY(Text))
    datas: Mapped[list[str]] = mapped_column(ARRAY(Text))
    published_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class SigningKey(Base):
    """A fingerprint of a running instance's signing key (``app.auth.signing_key``)."""

    __tablename__ = "signing_keys"

    fingerprint: Mapped[str] = mapped_column(Text, primary_key=True)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ExternalTombstone(Base):
    """An external user an admin deleted: its tokens issued before are refused."""

    __tablename__ = "external_tombstones"

    subject: Mapped[str] = mapped_column(Text, primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ApiKey(Base):
    """A backend publisher's key: only its public prefix and a hash are kept."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("uq_api_keys_prefix", "prefix", unique=True),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    publish: Mapped[list[str]] = mapped_column(ARRAY(Text))
    prefix: Mapped[str] = mapped_column(String(32))
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class InboxRow(Base):
    """An event ``ssehub_enqueue`` wrote in an application's transaction, waiting
    for a writer to move it into ``events`` (``app.events.inbox``). No foreign
    key: a transaction kept open must not block deleting the channel."""

    __tablename__ = "ssehub_inbox"
    # A transaction's rows in call order: a move takes a chunk of them.
    __table_args__ = (Index("ix_ssehub_inbox_txid_id", "txid", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    txid: Mapped[int] = mapped_column(XID8, server_default=text("pg_current_xact_id()"))
    channel_id: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[str] = mapped_column(String(64))
    data: Mapped[str] = mapped_column(Text)  # jsonb's text; the move stores it compact
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    enqueued_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.clock_timestamp()
    )


class StalledTransaction(Base):
    """An enqueueing transaction whose rows failed to move: set aside until
    ``retry_at``, so the transactions behind it move meanwhile (``app.events.inbox``)."""

    __tablename__ = "ssehub_inbox_stalled"

    txid: Mapped[int] = mapped_column(XID8, primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    retry_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    error: Mapped[str] = mapped_column(Text)


class InstanceLimit(Base):
    """The ``SSEHUB_MAX_EVENT_BYTES`` of a running instance, until ``expires_at``
    unless it is renewed (``app.events.enqueue_limit``)."""

    __tablename__ = "ssehub_instance_limits"

    instance: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    max_event_bytes: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PresenceInstance(Base):
    """A running instance's heartbeat: older than ``SSEHUB_PRESENCE_TTL_SECONDS``,
    the instance is dead and its leases go (``app.realtime.presence``)."""

    __tablename__ = "presence_instances"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PresenceLease(Base):
    """How many of a user's streams on one instance carry a presence channel."""

    __tablename__ = "presence_leases"

    channel_id: Mapped[int] = mapped_column(
        ForeignKey("channels.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("presence_instances.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    streams: Mapped[int] = mapped_column(Integer)
    since: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PresenceVersion(Base):
    """Raised by every change of a channel's leases: instances re-read only what changed."""

    __tablename__ = "presence_versions"

    channel_id: Mapped[int] = mapped_column(
        ForeignKey("channels.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(BigInteger)
