"""Presence: who has a stream carrying a channel, on every instance, kept as leases.

Each instance counts, every turn (at least every ``TURN_SECONDS``), the
streams of each presence channel per user from its hub, and writes what
changed as **leases** in Postgres (``presence_leases``: channel, user,
instance, streams, since), all of a turn's changes in one transaction: a
reconnect storm of thousands of streams is a handful of batched writes, not a
write per stream. A user's
leases stay while their streams close and reopen within the grace
(``SSEHUB_PRESENCE_GRACE_SECONDS``), so a reconnect moves nothing.

Each instance renews its one row in ``presence_instances`` every second (its
heartbeat covers all its leases at once) and deletes, with their leases, the
instances whose heartbeat is older than the TTL (``SSEHUB_PRESENCE_TTL_SECONDS``):
a killed instance cannot announce its own leaves, the others do.

Every change of a channel's leases raises its row in ``presence_versions``
and sends a ``presence_changed`` control message (``app.notify``), both in
the same transaction, so the message arrives when the change is readable.
Every instance's listener hears it, on either broker (control messages go
through Postgres alone: ``app.notify``), and hands it here as a hint
(``apply``): the next turn, started at once, re-reads the lists it names; the
list is one query (``_LIST``) every instance runs alike. The versions are the
net under the messages: once a heartbeat an instance probes the versions of
the channels its streams carry and re-reads those that moved, so a message
lost to a listener that was reconnecting costs at most a heartbeat's delay
(the reconnect itself also re-reads every list: ``Hints.everything``). A
stream opening on a presence channel wakes a turn too, so its join is
written at once: a join reaches every instance in a round trip, not in two
turns.

**Turns are bounded in rate** (``MIN_TURN_SECONDS``) whatever wakes them: a
reconnect storm, or a flood of forged messages (anyone may NOTIFY), costs at
most one turn per 0.1 s, each re-reading each carried list at most once.

Where the guarantees are kept:

- **The same list everywhere once nothing changes**: the list is what
  ``_LIST`` reads, leases of live instances only; every change sends a
  message every listener hears and raises a version every instance probes,
  and a full re-read every ``REREAD_SECONDS`` covers a change neither told (a
  heartbeat lapsing before its expiry).
- **No user listed without a stream**: a lease is written only by the
  instance counting that user's streams; it goes when the last of them has
  been closed for the grace (at once when the user may no longer read the
  channel), or with its instance once the heartbeat lapses, and ``_LIST``
  leaves out a lapsed instance's leases even before they are deleted.
- **No leave missed, no join told twice**: a stream gets the list itself
  (``ssehub.presence``) from its channel's ``View``, and from then on exactly
  the differences between the lists the view holds one after another
  (``ssehub.join``, ``ssehub.leave``; or the whole list again when that is
  shorter), taken and applied without an await in between
  (``View.replace``): the list plus the notices always add up to the list
  the view holds now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from app.channels.readable import readable
from app.db import raw_connection
from app.events.log import format_timestamp
from app.metrics import Metrics
from app.notify import Hints, notify_control_each_raw
from app.realtime.sse import notice_frame

log = logging.getLogger("ssehub")

TURN_SECONDS = 0.25  # count the streams at least this often: a grace ends within a turn
MIN_TURN_SECONDS = 0.1  # however often a message or an opening stream wakes a turn
HEARTBEAT_SECONDS = 1.0  # renew this row, expire the dead, which channels, probe the versions
REREAD_SECONDS = 5.0  # every list read again, whatever the versions say
MAX_NOTICES = 16  # up to this many changes in a turn are always told one by one

_HEARTBEAT = """
INSERT INTO public.presence_instances (id, heartbeat_at) VALUES ($1, clock_timestamp())
ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at
RETURNING (xmax = 0) AS inserted"""
# Leases of instances whose heartbeat lapsed, then the instances.
_EXPIRE_LEASES = """
DELETE FROM public.presence_leases l USING public.presence_instances i
WHERE l.instance_id = i.id AND i.heartbeat_at < clock_timestamp() - make_interval(secs => $1)
RETURNING l.channel_id, l.user_id"""
_EXPIRE_INSTANCES = """
DELETE FROM public.presence_instances
WHERE heartbeat_at < clock_timestamp() - make_interval(secs => $1)"""
# Of (channel, user) pairs whose leases went, those with none left: their leaves.
_LEFT = """
SELECT count(*) FROM unnest($1::bigint[], $2::bigint[]) AS t(channel_id, user_id)
WHERE NOT EXISTS (SELECT 1 FROM public.presence_leases l
                  WHERE l.channel_id = t.channel_id AND l.user_id = t.user_id)"""
_BUMP = """
INSERT INTO public.presence_versions (channel_id, version)
SELECT DISTINCT t.channel_id, 1 FROM unnest($1::bigint[]) AS t(channel_id)
JOIN public.channels c ON c.id = t.channel_id
ON CONFLICT (channel_id) DO UPDATE SET version = public.presence_versions.version + 1"""
# A channel deleted meanwhile is skipped (its leases went with it).
_UPSERT = """
INSERT INTO public.presence_leases (channel_id, user_id, instance_id, streams, since)
SELECT t.channel_id, t.user_id, $3, t.streams, t.since
FROM unnest($1::bigint[], $2::bigint[], $4::int[], $5::timestamptz[])
    AS t(channel_id, user_id, streams, since)
JOIN public.channels c ON c.id = t.channel_id AND c.presence
JOIN public.users u ON u.id = t.user_id
ON CONFLICT (channel_id, user_id, instance_id) DO UPDATE SET streams = excluded.streams"""
_DELETE = """
DELETE FROM public.presence_leases l
USING unnest($1::bigint[], $2::bigint[]) AS t(channel_id, user_id)
WHERE l.channel_id = t.channel_id AND l.user_id = t.user_id AND l.instance_id = $3"""
_CHANNELS = "SELECT id, name FROM public.channels WHERE presence"
# A channel deleted or turned off meanwhile has no row: it is forgotten at once.
_VERSIONS = """
SELECT c.id, v.version FROM public.channels c
LEFT JOIN public.presence_versions v ON v.channel_id = c.id
WHERE c.id = ANY($1::bigint[]) AND c.presence"""
_LIST = """
SELECT l.channel_id, u.username, sum(l.streams)::int, min(l.since)
FROM public.presence_leases l
JOIN public.presence_instances i ON i.id = l.instance_id
JOIN public.users u ON u.id = l.user_id
WHERE l.channel_id = ANY($1::bigint[])
  AND i.heartbeat_at >= clock_timestamp() - make_interval(secs => $2)
GROUP BY l.channel_id, u.username
ORDER BY l.channel_id, u.username COLLATE "C\""""
# Of (channel, user) pairs about to leave, those who may no longer read the channel
# (the rule is NULL, not false, for a private channel without an owner).
_UNREADABLE = f"""
SELECT t.channel_id, t.user_id
FROM unnest($1::bigint[], $2::bigint[]) AS t(channel_id, user_id)
JOIN public.users u ON u.id = t.user_id
JOIN public.channels c ON c.id = t.channel_id
WHERE {readable("c", "u.id", "u.is_admin")} IS NOT TRUE"""  # noqa: S608 - a constant condition
# A stopping instance's leases lapse after the grace, not at once: its streams'
# clients reconnect to another instance meanwhile, and nobody leaves.
_RETIRE = """
UPDATE public.presence_instances
SET heartbeat_at = clock_timestamp() - make_interval(secs => $2) WHERE id = $1"""


class Carrier(Protocol):
    """A stream, as presence sees it."""

    @property
    def user_id(self) -> int: ...

    def notify(self, frame: bytes) -> None: ...


class Streams(Protocol):
    """The hub, as presence sees it."""

    def subscribers_of(self, channel_id: int) -> AbstractSet[Carrier]: ...


@dataclass(frozen=True, slots=True)
class Present:
    """One user in a channel's list."""

    username: str
    streams: int
    since: datetime

    def as_json(self) -> dict[str, Any]:
        since = format_timestamp(self.since)  # as events' published_at
        return {"username": self.username, "streams": self.streams, "since": since}


def listing(channel: str, users: Iterable[Present]) -> dict[str, Any]:
    """The list as ``GET /channels/{name}/presence`` and ``ssehub.presence`` give it."""
    ordered = sorted(users, key=lambda user: user.username.encode())
    return {"channel": channel, "users": [user.as_json() for user in ordered]}


@dataclass(slots=True)
class View:
    """This instance's copy of one channel's list, and the streams it tells."""

    channel: str
    users: dict[str, Present] = field(default_factory=dict)
    version: int | None = None  # None: never read
    watchers: set[Carrier] = field(default_factory=set)  # streams told the list
    _frame: bytes | None = None

    def snapshot(self, stream: Carrier) -> bytes:
        """``ssehub.presence`` for a stream, which from now on is told every change;
        nothing for a stream told already."""
        if stream in self.watchers:
            return b""
        if self._frame is None:
            self._frame = notice_frame(
                "ssehub.presence", listing(self.channel, self.users.values())
            )
        self.watchers.add(stream)
        return self._frame

    def replace(self, users: dict[str, Present], version: int | None) -> bytes:
        """Hold ``users`` from now on; the joins and leaves between, framed once per
        turn for every stream, or the list itself when that is shorter (a mass
        leave): what a stream is sent per turn never exceeds the list's size."""
        joined = [name for name in users if name not in self.users]
        left = [name for name in self.users if name not in users]
        if users != self.users:
            self._frame = None
        self.users, self.version = users, version
        if len(joined) + len(left) <= MAX_NOTICES:
            return self._notices(joined, left)
        notices = self._notices(joined, left)
        whole = notice_frame("ssehub.presence", listing(self.channel, users.values()))
        self._frame = whole
        return whole if len(whole) < len(notices) else notices

    def _notices(self, joined: list[str], left: list[str]) -> bytes:
        return b"".join(
            [self._notice("ssehub.join", name) for name in sorted(joined, key=str.encode)]
            + [self._notice("ssehub.leave", name) for name in sorted(left, key=str.encode)]
        )

    def _notice(self, kind: str, username: str) -> bytes:
        return notice_frame(kind, {"channel": self.channel, "username": username})


@dataclass(slots=True)
class Lease:
    """What this instance wrote for one user in one channel."""

    streams: int
    since: datetime
    leave_at: float | None = None  # monotonic: the grace's end, once it has no stream


class Presence:
    """This instance's side of presence: its leases, its views, its turns."""

    def __init__(self, pool: Any, hub: Streams, metrics: Metrics, grace: float, ttl: float) -> None:
        self._pool = pool
        self._hub = hub
        self._metrics = metrics
        self._grace = grace
        self._ttl = ttl
        self.instance = uuid.uuid4()
        self._enabled: dict[int, str] = {}  # presence channels: id -> name
        self._leases: dict[tuple[int, int], Lease] = {}
        self._unwritten: set[tuple[int, int]] = set()
        self._views: dict[int, View] = {}
        self._loading: dict[int, asyncio.Future[None]] = {}
        self._stale: set[int] = set()  # channels whose list a message says moved
        self._stale_all = False  # every list: the listener reconnected, or a flood
        self._woken = asyncio.Event()  # a turn is due now, not at TURN_SECONDS
        self._heartbeat_due = 0.0
        self._probe_due = 0.0
        self._reread_due = 0.0

    # -- streams ---------------------------------------------------------

    def channels_of(self, channels: Mapping[int, str]) -> list[int]:
        """Which of a stream's channels keep presence."""
        return [channel_id for channel_id in channels if channel_id in self._enabled]

    async def snapshots(self, stream: Carrier, channels: Mapping[int, str]) -> bytes:
        """``ssehub.presence`` for each presence channel of an opening stream, read
        (once for all the streams asking) if this instance holds no list of it yet."""
        wanted = self.channels_of(channels)
        if wanted:
            self._woken.set()  # its join: counted and written now
        missing = [c for c in wanted if c not in self._views]
        if missing:
            await self._load(missing)
        return b"".join(self._views[c].snapshot(stream) for c in wanted if c in self._views)

    # -- messages ----------------------------------------------------------

    async def apply(self, conn: Any, hints: Hints) -> None:
        """A ``ControlHandler``: the lists ``hints`` names may have moved. Noted,
        and a turn woken to re-read them; nothing is read here, on the
        listener's connection, and nothing is believed: the turn reads the
        leases."""
        if hints.everything:
            self._stale_all = True
        else:
            self._stale |= hints.presence
        if self._stale_all or self._stale:
            self._woken.set()

    # -- turns -----------------------------------------------------------

    async def run(self) -> None:
        """Turn forever, every ``TURN_SECONDS`` or sooner when woken, never more
        often than ``MIN_TURN_SECONDS``; a failed turn (the database away) is
        logged and retried."""
        while True:
            self._woken.clear()
            try:
                async with asyncio.timeout(max(5.0, TURN_SECONDS * 8)):
                    await self.turn()
            except Exception as exc:
                log.warning("presence: turn failed: %s", exc)
            await asyncio.sleep(MIN_TURN_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), TURN_SECONDS - MIN_TURN_SECONDS)

    async def turn(self) -> None:
        """Count, write what changed, expire the dead, re-read what changed, tell."""
        now = time.monotonic()
        async with raw_connection(self._pool) as conn:
            if now >= self._heartbeat_due:
                self._heartbeat_due = now + HEARTBEAT_SECONDS
                await self._heartbeat(conn)
                await self._refresh_channels(conn)
                await self._expire(conn)
            self._count(now)
            await self._leave_unreadable(conn)
            await self._write(conn)
            await self._follow_lists(conn, now)

    async def retire(self) -> None:
        """Stopping: the leases lapse after the grace (``_RETIRE``)."""
        async with raw_connection(self._pool) as conn:
            await conn.execute(_RETIRE, self.instance, max(0.0, self._ttl - self._grace))

    async def _heartbeat(self, conn: Any) -> None:
        """Renew this instance's row. If it was gone (others took this instance for
        dead while the database was away), every lease is written again."""
        if await conn.fetchval(_HEARTBEAT, self.instance) and self._leases:
            self._unwritten.update(self._leases)

    async def _refresh_channels(self, conn: Any) -> None:
        """Which channels keep presence; a channel turned off is forgotten here (the
        PATCH deleted its leases), one turned on is counted from this turn."""
        self._enabled = {row[0]: row[1] for row in await conn.fetch(_CHANNELS)}
        self._forget(
            [c for c in {*self._views, *(k[0] for k in self._leases)} if c not in self._enabled]
        )

    def _forget(self, channels: list[int]) -> None:
        """Channels deleted or turned off: their leases went with them (cascade, or
        the PATCH), and their streams are told nothing more."""
        for channel_id in channels:
            self._enabled.pop(channel_id, None)
            self._views.pop(channel_id, None)
        gone = set(channels)
        for key in [key for key in self._leases if key[0] in gone]:
            del self._leases[key]
            self._unwritten.discard(key)

    async def _expire(self, conn: Any) -> None:
        async with conn.transaction():
            gone = await conn.fetch(_EXPIRE_LEASES, self._ttl)
            await conn.execute(_EXPIRE_INSTANCES, self._ttl)
            if not gone:
                return
            channels = [row[0] for row in gone]
            await self._changed(conn, channels)
            left = await conn.fetchval(_LEFT, channels, [row[1] for row in gone])
        self._metrics.presence_dead_leaves.inc(left)

    def _count(self, now: float) -> None:
        """This instance's streams per user in each presence channel, against its
        leases: a new or changed count is to be written, a lost one starts its grace,
        a grace that ended is to be deleted."""
        counts: dict[tuple[int, int], int] = {}
        for channel_id in self._enabled:
            for stream in self._hub.subscribers_of(channel_id):
                key = (channel_id, stream.user_id)
                counts[key] = counts.get(key, 0) + 1
        wall = datetime.now(UTC)
        for key, streams in counts.items():
            lease = self._leases.get(key)
            if lease is None:
                self._leases[key] = Lease(streams, wall)
            elif lease.streams != streams or lease.leave_at is not None:
                lease.streams, lease.leave_at = streams, None
            else:
                continue
            self._unwritten.add(key)
        for key, lease in self._leases.items():
            if key in counts:
                continue
            if lease.leave_at is None:
                lease.streams, lease.leave_at = 0, now + self._grace
                self._unwritten.add(key)
            elif lease.leave_at <= now:
                self._unwritten.add(key)
        self._metrics.presence_users.set(len({user for _, user in self._leases}))

    async def _leave_unreadable(self, conn: Any) -> None:
        """A user in grace who may no longer read the channel (removed from it,
        demoted) leaves now: no reconnect can bring them back."""
        waiting = [key for key, lease in self._leases.items() if lease.leave_at is not None]
        if not waiting:
            return
        rows = await conn.fetch(_UNREADABLE, [k[0] for k in waiting], [k[1] for k in waiting])
        for channel_id, user_id in rows:
            self._leases[(channel_id, user_id)].leave_at = 0.0
            self._unwritten.add((channel_id, user_id))

    async def _write(self, conn: Any) -> None:
        """Every change of this turn in one transaction, with the versions raised."""
        if not self._unwritten:
            return
        now = time.monotonic()
        keys = list(self._unwritten)
        ending = [
            k
            for k in keys
            if (lease := self._leases[k]).leave_at is not None and lease.leave_at <= now
        ]
        ending_set = set(ending)
        kept = [k for k in keys if k not in ending_set]
        async with conn.transaction():
            if kept:
                leases = [self._leases[k] for k in kept]
                await conn.execute(
                    _UPSERT,
                    [k[0] for k in kept],
                    [k[1] for k in kept],
                    self.instance,
                    [lease.streams for lease in leases],
                    [lease.since for lease in leases],
                )
            if ending:
                await conn.execute(
                    _DELETE, [k[0] for k in ending], [k[1] for k in ending], self.instance
                )
            await self._changed(conn, [k[0] for k in keys])
        for key in ending:
            del self._leases[key]
        self._unwritten.clear()
        self._metrics.presence_lease_writes.inc(len(keys))
        self._metrics.presence_write_transactions.inc()

    async def _changed(self, conn: Any, channels: list[int]) -> None:
        """In the transaction that changed these channels' leases: raise their
        versions and tell every instance (this one too: its next turn re-reads)."""
        ordered = sorted(set(channels))
        await conn.execute(_BUMP, ordered)
        await notify_control_each_raw(
            conn, "presence_changed", [{"channel_id": c} for c in ordered]
        )
        self._stale.update(ordered)

    async def _follow_lists(self, conn: Any, now: float) -> None:
        """Re-read the lists of the carried presence channels that a message
        named, or whose version moved (probed once a heartbeat), or all of them
        every ``REREAD_SECONDS``, and tell their streams."""
        carried = [c for c in self._enabled if self._hub.subscribers_of(c)]
        for channel_id in [c for c in self._views if c not in carried]:
            del self._views[channel_id]
        named, self._stale = self._stale, set()
        every, self._stale_all = self._stale_all, False
        if not carried:
            return
        reread = every or now >= self._reread_due
        if reread:
            self._reread_due = now + REREAD_SECONDS
        probe = reread or now >= self._probe_due
        if probe:
            self._probe_due = now + HEARTBEAT_SECONDS
        asked = carried if probe else [c for c in carried if c in named or c not in self._views]
        if asked:
            # The versions before the lists: a change between the two reads
            # leaves a version behind its list, which the next probe re-reads.
            versions = dict(await conn.fetch(_VERSIONS, asked))
            self._forget([c for c in asked if c not in versions])
            stale = [
                c
                for c in asked
                if c in versions and (reread or c in named or self._behind(c, versions[c]))
            ]
            if stale:
                lists = await self._read(conn, stale)
                for channel_id in stale:
                    self._apply(channel_id, lists.get(channel_id, {}), versions[channel_id])
        for channel_id in carried:
            if channel_id in self._enabled:
                self._tell_newcomers(channel_id)

    def _behind(self, channel_id: int, version: int | None) -> bool:
        view = self._views.get(channel_id)
        return view is None or view.version != version

    async def _load(self, channels: list[int]) -> None:
        """Read lists no view holds yet, once however many streams wait for them."""
        mine = [c for c in channels if c not in self._loading]
        if mine:
            done = asyncio.get_running_loop().create_future()
            for channel_id in mine:
                self._loading[channel_id] = done
            try:
                async with raw_connection(self._pool) as conn:
                    versions = dict(await conn.fetch(_VERSIONS, mine))
                    lists = await self._read(conn, mine)
                for channel_id in mine:
                    if channel_id not in self._views:
                        self._apply(channel_id, lists.get(channel_id, {}), versions.get(channel_id))
            finally:
                for channel_id in mine:
                    del self._loading[channel_id]
                done.set_result(None)
        for waiting in {id(f): f for c in channels if (f := self._loading.get(c))}.values():
            await asyncio.shield(waiting)

    def _apply(self, channel_id: int, users: dict[str, Present], version: int | None) -> None:
        """The view holds ``users`` now; the streams it told are told the difference."""
        name = self._enabled.get(channel_id)
        if name is None:
            return
        view = self._views.get(channel_id)
        if view is None:
            self._views[channel_id] = View(name, users, version)
            return
        notices = view.replace(users, version)
        if notices:
            for stream in view.watchers:
                stream.notify(notices)

    def _tell_newcomers(self, channel_id: int) -> None:
        """Streams that carry the channel but were never told its list (it was
        turned on, or they subscribed since) get it now, queued; streams that no
        longer carry it are forgotten."""
        view = self._views.get(channel_id)
        if view is None:
            return
        carrying = set(self._hub.subscribers_of(channel_id))  # notify may end one
        view.watchers &= carrying
        for stream in carrying - view.watchers:
            stream.notify(view.snapshot(stream))

    async def _read(self, conn: Any, channels: list[int]) -> dict[int, dict[str, Present]]:
        return await read_lists(conn, channels, self._ttl)


async def read_lists(conn: Any, channels: list[int], ttl: float) -> dict[int, dict[str, Present]]:
    """The lists of ``channels`` from the leases of live instances, as every
    instance and ``GET /channels/{name}/presence`` read them."""
    lists: dict[int, dict[str, Present]] = {c: {} for c in channels}
    for channel_id, username, streams, since in await conn.fetch(_LIST, channels, ttl):
        lists[channel_id][username] = Present(username, streams, since)
    return lists
