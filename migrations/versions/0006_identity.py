"""Your application's identities: external users, personal channels, API keys

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

- ``users.external_subject``: the identity provider's name for a user created
  from its token (app/auth/external.py); such a user has no password.
  ``external_tombstones`` remembers when an admin deleted one, so tokens
  issued before the deletion stay refused.
- ``channels.owner_id``: a personal channel ``@USERNAME``, created with its
  user and deleted with it (a cascade); one for every existing user.
- ``api_keys``: backend publishers' credentials, kept only as a hash
  (app/auth/api_keys.py).
- ``ssehub_publish_as`` takes the caller as a user or an API key.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _run(script: str) -> None:
    """Each statement on its own: asyncpg prepares one statement per call."""
    for statement in script.split(";\n"):
        if statement.strip():
            op.execute(statement)


PUBLISH_AS = """
CREATE FUNCTION ssehub_publish_as(
    p_user_ids bigint[], p_key_ids bigint[], p_channels text[], p_types text[],
    p_datas text[], p_keys text[]
) RETURNS TABLE (
    row_number bigint, status text, event_id bigint, event_channel_id bigint,
    event_type text, event_data text, event_published_at timestamptz
) LANGUAGE plpgsql AS $$
DECLARE
    allowed boolean[]; -- per row: the caller may publish; false: a user who is no admin; NULL: no such caller
    cids bigint[];     -- per row: the channel's id, NULL if there is no such channel
    fresh boolean[];   -- per row: to be inserted (allowed, and its key not used before)
    n_valid bigint;
    n_fresh bigint := 0;
    first_id bigint;
    at timestamptz;
BEGIN
    -- Rights first, without the lock: a row nobody may publish costs no wait. An
    -- API key's patterns were matched by the server; here it must still exist.
    SELECT array_agg(CASE WHEN u.kid IS NOT NULL THEN CASE WHEN k.id IS NULL THEN NULL ELSE true END
                          ELSE usr.is_admin END ORDER BY u.n),
           array_agg(ch.id ORDER BY u.n)
    INTO allowed, cids
    FROM unnest(p_user_ids, p_key_ids, p_channels) WITH ORDINALITY AS u(uid, kid, cname, n)
    LEFT JOIN users usr ON usr.id = u.uid
    LEFT JOIN api_keys k ON k.id = u.kid
    LEFT JOIN channels ch ON ch.name = u.cname;
    SELECT count(*) INTO n_valid
    FROM generate_subscripts(allowed, 1) AS i WHERE allowed[i] AND cids[i] IS NOT NULL;

    IF n_valid > 0 THEN
        -- The lock: no id is drawn by anyone else until this transaction commits.
        PERFORM pg_advisory_xact_lock(351819);  -- 0x55E4B, app.events.publisher.PUBLISH_LOCK
        -- A keyed row is fresh if its key is not stored yet and no earlier row of
        -- this call carries it (keys are read under the lock: no race).
        SELECT array_agg(f ORDER BY n), count(*) FILTER (WHERE f)
        INTO fresh, n_fresh
        FROM (
            SELECT u.n,
                   coalesce(allowed[u.n], false) AND cids[u.n] IS NOT NULL AND (
                       u.k IS NULL OR (
                           row_number() OVER (
                               PARTITION BY coalesce(allowed[u.n], false), cids[u.n], u.k
                               ORDER BY u.n) = 1
                           AND NOT EXISTS (
                               SELECT 1 FROM idempotency_keys ik
                               WHERE ik.channel_id = cids[u.n] AND ik.key = u.k))) AS f
            FROM unnest(p_keys) WITH ORDINALITY AS u(k, n)
        ) keyed;
    END IF;

    IF n_fresh > 0 THEN
        -- Only publishers draw ids, all under the lock: one nextval and one setval
        -- reserve the whole range, handed out in row order.
        first_id := nextval(pg_get_serial_sequence('events', 'id'));
        IF n_fresh > 1 THEN
            PERFORM setval(pg_get_serial_sequence('events', 'id'), first_id + n_fresh - 1);
        END IF;
        -- One publish time for the whole transaction: its events are published together.
        at := clock_timestamp();
        WITH numbered AS (
            SELECT cids[u.n] AS cid, u.t, u.d, u.k,
                   first_id + row_number() OVER (ORDER BY u.n) - 1 AS id
            FROM unnest(p_types, p_datas, p_keys) WITH ORDINALITY AS u(t, d, k, n)
            WHERE fresh[u.n]
        ), inserted AS (
            INSERT INTO events (id, channel_id, type, data, published_at)
            SELECT nb.id, nb.cid, nb.t, nb.d, at FROM numbered nb
        )
        INSERT INTO idempotency_keys (channel_id, key, event_id, type, data, published_at)
        SELECT nb.cid, nb.k, nb.id, nb.t, nb.d, at FROM numbered nb WHERE nb.k IS NOT NULL;
        PERFORM pg_notify('ssehub_events', (first_id + n_fresh - 1)::text);
    END IF;

    RETURN QUERY
    WITH req AS (
        SELECT u.n, u.k, allowed[u.n] AS ok, cids[u.n] AS cid,
               coalesce(fresh[u.n], false) AS f,
               first_id - 1 + sum(CASE WHEN coalesce(fresh[u.n], false) THEN 1 ELSE 0 END)
                   OVER (ORDER BY u.n) AS id
        FROM unnest(p_keys) WITH ORDINALITY AS u(k, n)
    )
    SELECT req.n,
           CASE WHEN req.ok IS NULL THEN 'unauthorized'
                WHEN NOT req.ok THEN 'forbidden'
                WHEN req.cid IS NULL THEN 'not_found'
                WHEN req.f THEN 'created'
                ELSE 'duplicate' END,
           CASE WHEN req.f THEN req.id ELSE ik.event_id END,
           req.cid,
           ik.type::text,
           ik.data,
           CASE WHEN req.f THEN at ELSE ik.published_at END
    FROM req
    LEFT JOIN idempotency_keys ik
        ON NOT req.f AND req.ok AND ik.channel_id = req.cid AND ik.key = req.k
    ORDER BY req.n;
END
$$
"""


def upgrade() -> None:
    _run(
        """
ALTER TABLE users ALTER COLUMN password_hash DROP NOT NULL;
ALTER TABLE users ADD COLUMN external_subject text;
CREATE UNIQUE INDEX uq_users_external_subject ON users (external_subject);
CREATE TABLE external_tombstones (
    subject text PRIMARY KEY,
    deleted_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE channels ALTER COLUMN name TYPE varchar(65);
ALTER TABLE channels ADD COLUMN owner_id bigint REFERENCES users (id) ON DELETE CASCADE;
CREATE UNIQUE INDEX uq_channels_owner_id ON channels (owner_id);
INSERT INTO channels (name, private, owner_id)
SELECT '@' || username, true, id FROM users ON CONFLICT (name) DO NOTHING;
CREATE TABLE api_keys (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name varchar(100) NOT NULL,
    publish text[] NOT NULL,
    prefix varchar(32) NOT NULL,
    secret_hash bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz
);
CREATE UNIQUE INDEX uq_api_keys_prefix ON api_keys (prefix);
DROP FUNCTION ssehub_publish_as(bigint[], text[], text[], text[], text[])
"""
    )
    op.execute(PUBLISH_AS)


def downgrade() -> None:
    from importlib import util
    from pathlib import Path

    spec = util.spec_from_file_location(
        "publish_0004", Path(__file__).with_name("0004_idempotency_keys.py")
    )
    assert spec and spec.loader
    previous = util.module_from_spec(spec)
    spec.loader.exec_module(previous)
    _run(
        """
DROP FUNCTION ssehub_publish_as(bigint[], bigint[], text[], text[], text[], text[]);
DROP TABLE api_keys;
DELETE FROM channels WHERE owner_id IS NOT NULL;
DROP INDEX uq_channels_owner_id;
ALTER TABLE channels DROP COLUMN owner_id;
ALTER TABLE channels ALTER COLUMN name TYPE varchar(64);
DROP TABLE external_tombstones;
DROP INDEX uq_users_external_subject;
ALTER TABLE users DROP COLUMN external_subject;
DELETE FROM users WHERE password_hash IS NULL;
ALTER TABLE users ALTER COLUMN password_hash SET NOT NULL
"""
    )
    op.execute(previous.PUBLISH_AS)
