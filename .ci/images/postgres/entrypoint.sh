#!/bin/sh
# The official postgres image's entrypoint, in part: POSTGRES_PASSWORD, POSTGRES_USER,
# POSTGRES_DB; a first start initialises the cluster (password auth over TCP), with
# TCP closed until it is done, as the official image does.
set -e
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=$POSTGRES_USER}"
mkdir -p "$PGDATA" /run/postgresql && chown -R postgres:postgres "$PGDATA" /run/postgresql && chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pw=$(mktemp); printf '%s\n' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}" > "$pw"; chown postgres "$pw"
  su postgres -s /bin/sh -c "initdb -D '$PGDATA' -U '$POSTGRES_USER' --pwfile='$pw' --auth-local=trust --auth-host=scram-sha-256" >/dev/null
  rm -f "$pw"; echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  su postgres -s /bin/sh -c "pg_ctl -D '$PGDATA' -o \"-c listen_addresses=''\" -w start" >/dev/null
  [ "$POSTGRES_DB" = postgres ] || su postgres -s /bin/sh -c "psql -q -U '$POSTGRES_USER' -d postgres -c 'CREATE DATABASE \"$POSTGRES_DB\"'"
  su postgres -s /bin/sh -c "pg_ctl -D '$PGDATA' -m fast -w stop" >/dev/null
fi
if [ "$1" = postgres ]; then shift; exec su postgres -s /bin/sh -c 'exec postgres -D "$PGDATA" -c listen_addresses="*" "$@"' -- sh "$@"; fi
exec "$@"
