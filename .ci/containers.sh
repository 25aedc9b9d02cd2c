#!/usr/bin/env bash
# CI for the deployment files, with Debian's podman (no Docker engine, no container
# registry: the Debian mirror and PyPI only; run as root, as .ci/run is):
#   1. the Dockerfile is built and run against this machine's Postgres: /readyz answers,
#      the HEALTHCHECK passes on a port other than the default, the process is not root,
#      and a publish reaches a stream through it;
#   2. docker-compose.yml is brought up with podman-compose (Postgres, two instances,
#      Caddy) and tests/deploy/test_through_caddy.py drives Chromium through Caddy over
#      HTTP/2.
# Needs Postgres on 127.0.0.1:5432 (trust for user postgres), as .ci/run starts it.
# Env: CTR_WORK: scratch directory (default /var/tmp/ssehub-ctr); the Debian base image's
#      tarball is kept there and made again only when missing.
#      KEEP_IMAGES=1: keep the images afterwards (a second run then skips their builds).
set -euo pipefail
cd "$(dirname "$0")/.."
exec </dev/null
SRC=$PWD
WORK=${CTR_WORK:-/var/tmp/ssehub-ctr}
PROJECT=ssehub-ci
NETWORK=ssehub            # docker-compose.yml's network, and the range it trusts
SUBNET=172.30.77.0/24
mkdir -p "$WORK"
step() { echo "=== [${SECONDS}s] $*"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
random_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
# Poll a command until it succeeds, for at most $1 seconds.
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        if [ "$SECONDS" -ge "$deadline" ]; then echo "timed out waiting for: $*" >&2; return 1; fi
        sleep 0.5
    done
}

step tools
# Debian's packages; runc because crun 1.8 rejects this kernel's hybrid cgroup layout.
missing=()
for tool in podman:podman buildah:buildah runc:runc debootstrap:debootstrap \
    podman-compose:podman-compose slirp4netns:slirp4netns curl:curl psql:postgresql-client \
    chromium:chromium; do
    command -v "${tool%%:*}" >/dev/null || [ -x "/usr/sbin/${tool%%:*}" ] || missing+=("${tool#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
make .venv/.installed >/dev/null   # Playwright, for the browser test

step podman config
# Kept out of /etc. No CAP_SYS_RESOURCE here: the root defaults (nofile=1048576,
# nproc=4194304) cannot be set, so containers get this machine's hard limits; podman
# itself caps RLIMIT_NPROC at 32768.
export CONTAINERS_CONF=$WORK/containers.conf
NOFILE=$(ulimit -Hn); NPROC=$(ulimit -Hu)
if [ "$NPROC" = unlimited ] || [ "$NPROC" -gt 32768 ]; then NPROC=32768; fi
cat > "$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
[engine]
runtime = "runc"
EOF
podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.NetworkBackend}} cgroup v{{.Host.CgroupsVersion}}'

step base image
# No registry: a Debian 12 root file system with Debian's python3 (3.11), imported under
# the name the Dockerfile starts from, so the Dockerfile and compose file run unchanged.
# The stand-ins for postgres:15 and caddy:2 (.ci/images/) start from it too.
BASE=docker.io/library/python:3.11-slim
BASE_TAR=$WORK/debian-python-bookworm.tar
if ! podman image exists "$BASE"; then
    if [ ! -s "$BASE_TAR" ]; then
        MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        [ -n "$MIRROR" ] || MIRROR=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
        [ -n "$MIRROR" ] || { echo "no Debian mirror configured for apt" >&2; exit 1; }
        R=$WORK/rootfs; rm -rf "$R"
        debootstrap --variant=minbase bookworm "$R" "$MIRROR" >/dev/null
        printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s-security bookworm-security main\n' \
            "$MIRROR" "$MIRROR" "$MIRROR" > "$R/etc/apt/sources.list"
        mount -t proc proc "$R/proc"; trap 'umount "$R/proc" 2>/dev/null || true' EXIT
        chroot "$R" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends python3 python3-venv python-is-python3 ca-certificates >/dev/null \
            && apt-get clean && rm -rf /var/lib/apt/lists/*' 2>&1 | grep -v 'posix_openpt\|delaying package' || true
        umount "$R/proc"; trap - EXIT
        tar --numeric-owner -C "$R" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
        rm -rf "$R"
    fi
    podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$BASE_TAR" "$BASE" >/dev/null
fi

step build the images
# The stand-ins for postgres:15 and caddy:2 build meanwhile (apt, where this one waits on pip).
standins_log=$WORK/standins.log
(
    podman build -q --pull=never --format docker -t docker.io/library/postgres:15 .ci/images/postgres
    podman build -q --pull=never --format docker -t docker.io/library/caddy:2 .ci/images/caddy
) >"$standins_log" 2>&1 &
standins_pid=$!
# pip in the build trusts what this machine trusts: its CA bundle, mounted for the RUN
# steps only (not kept in the image). --format docker keeps the HEALTHCHECK.
BUILD_ARGS=(--pull=never --format docker -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
IMAGE=localhost/ssehub:latest   # docker-compose.yml's `ssehub:latest`
podman build -q "${BUILD_ARGS[@]}" -t "$IMAGE" "$SRC" >/dev/null
[ "$(podman image inspect "$IMAGE" --format '{{.Config.User}}')" = ssehub ]

step smoke test the image
# Against this machine's Postgres, reached from the container's own slirp4netns network
# as 10.0.2.2. SSEHUB_PORT moves the port off the default: the health check must follow.
DB=ctrtest_$(random_hex 4)
KEY=$(random_hex 32)
ADMIN_PASSWORD=$(random_hex 12)
SMOKE_PORT=$(free_port)
SMOKE=ssehub-smoke-$(random_hex 3)
psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $DB"
smoke_cleanup() {
    podman rm -f -t 2 "$SMOKE" >/dev/null 2>&1 || true
    psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
}
trap smoke_cleanup EXIT
podman run -d --name "$SMOKE" --network slirp4netns:allow_host_loopback=true \
    -p "127.0.0.1:$SMOKE_PORT:8080" -e SSEHUB_PORT=8080 \
    -e "SSEHUB_DATABASE_URL=postgresql+asyncpg://postgres@10.0.2.2:5432/$DB" -e "SSEHUB_SECRET_KEY=$KEY" \
    -e SSEHUB_ADMIN_USERNAME=admin -e "SSEHUB_ADMIN_PASSWORD=$ADMIN_PASSWORD" \
    "$IMAGE" >/dev/null 2> >(grep -v 'systemd connection' >&2)
BASE_URL=http://127.0.0.1:$SMOKE_PORT
wait_for 60 curl -fs -o /dev/null "$BASE_URL/readyz"
echo "readyz: $(curl -fsS "$BASE_URL/readyz")"
# No systemd here, so podman cannot run HEALTHCHECK on its timer: run it by hand.
podman healthcheck run "$SMOKE"
[ "$(podman inspect "$SMOKE" --format '{{.State.Health.Status}}')" = healthy ]
uid=$(podman exec "$SMOKE" id -u)
echo "runs as uid $uid"; [ "$uid" != 0 ]
TOKEN=$(curl -fsS -d username=admin -d "password=$ADMIN_PASSWORD" "$BASE_URL/auth/token" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')
AUTH="Authorization: Bearer $TOKEN"
curl -fsS -o /dev/null -H "$AUTH" -H 'Content-Type: application/json' -d '{"name": "smoke"}' "$BASE_URL/channels"
STREAM=$WORK/smoke-stream.txt; : > "$STREAM"
curl -sS -N --max-time 20 -H "$AUTH" "$BASE_URL/channels/smoke/stream" > "$STREAM" &
stream_pid=$!
wait_for 15 grep -q '^retry:' "$STREAM"     # the stream is open
curl -fsS -o /dev/null -H "$AUTH" -H 'Content-Type: application/json' \
    -d '{"type": "message", "data": {"hello": "container"}}' "$BASE_URL/channels/smoke/events"
wait_for 15 grep -q '"hello":"container"' "$STREAM"
kill "$stream_pid" 2>/dev/null || true; wait "$stream_pid" 2>/dev/null || true
grep '^data: .*"hello"' "$STREAM"
smoke_cleanup; trap - EXIT

step stand-in images
wait "$standins_pid" || { cat "$standins_log"; exit 1; }

step compose up
# podman-compose 1.0 does not apply the compose file's ipam: the network is made here
# with the range SSEHUB_TRUSTED_PROXIES names. No .env: compose reads these variables
# from the environment.
export HTTPS_PORT SSEHUB_SECRET_KEY SSEHUB_ADMIN_USERNAME=admin SSEHUB_ADMIN_PASSWORD
HTTPS_PORT=$(free_port)
SSEHUB_SECRET_KEY=$(random_hex 32)
SSEHUB_ADMIN_PASSWORD=$(random_hex 12)
pc() { podman-compose -p "$PROJECT" "$@"; }
compose_down() {
    pc down -v -t 5 >/dev/null 2>&1 || true
    podman network rm -f "$NETWORK" >/dev/null 2>&1 || true
}
on_failure() {
    for name in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
        echo "--- $name"; podman logs -t --tail 40 "$name" 2>&1 || true
    done
    compose_down
}
compose_down   # what a failed run may have left
trap on_failure EXIT
podman network create --subnet "$SUBNET" "$NETWORK" >/dev/null
# All at once, as an orchestrator would: the instances wait for Postgres themselves.
pc up -d --no-build >"$WORK/compose-up.log" 2>&1 || { cat "$WORK/compose-up.log"; exit 1; }
CADDY=${PROJECT}_caddy_1
INSTANCES=(${PROJECT}_ssehub-1_1 ${PROJECT}_ssehub-2_1)
healthy() { podman healthcheck run "$1" >/dev/null 2>&1; }
for name in "${INSTANCES[@]}"; do wait_for 120 healthy "$name"; done
CA=$WORK/caddy-root.crt
caddy_ca() { podman exec "$CADDY" cat /data/caddy/pki/authorities/local/root.crt > "$CA" 2>/dev/null; }
wait_for 60 caddy_ca
URL=https://localhost:$HTTPS_PORT
wait_for 60 curl -fs -o /dev/null --cacert "$CA" "$URL/readyz"
for name in "${INSTANCES[@]}"; do
    echo "$name: $(podman logs "$name" 2>&1 | grep -c 'waiting for the database') tries before Postgres answered"
done

step through caddy with curl
# TLS that verifies against Caddy's CA, HTTP/2, HTTP/3 offered on the port Caddy listens on.
version=$(curl -sS -o /dev/null -w '%{http_version}' --http2 --cacert "$CA" "$URL/healthz")
echo "HTTP version: $version"; [ "$version" = 2 ]
curl -sS -D - -o /dev/null --cacert "$CA" "$URL/healthz" | grep -i "^alt-svc: .*h3=\":$HTTPS_PORT\""
# X-Forwarded-For: Caddy replaces a client's own with the address it sees, and the instances
# trust Caddy's, so the access log shows that address: not the forged one, not Caddy's.
probe=xff-$(random_hex 4)
curl -fsS -o /dev/null --cacert "$CA" -H 'X-Forwarded-For: 203.0.113.9' "$URL/healthz?$probe"
caddy_ip=$(podman inspect "$CADDY" --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}')
logged() { podman logs "${INSTANCES[0]}" 2>&1; podman logs "${INSTANCES[1]}" 2>&1; }
probe_logged() { logged | grep -F "$probe" >/dev/null; }  # all read: no SIGPIPE under pipefail
wait_for 10 probe_logged
client=$(logged | grep "$probe" | sed -E 's/^INFO: +([^ ]+):[0-9]+ - .*/\1/')
echo "client address as an instance logged it: $client (Caddy: $caddy_ip)"
[ -n "$client" ] && [ "$client" != 203.0.113.9 ] && [ "$client" != "$caddy_ip" ]

step browser test through caddy
DEPLOY_URL=$URL DEPLOY_CA=$CA DEPLOY_ADMIN_PASSWORD=$SSEHUB_ADMIN_PASSWORD \
DEPLOY_INSTANCES=$(IFS=,; echo "${INSTANCES[*]}") \
    .venv/bin/pytest tests/deploy/test_through_caddy.py -n 0 -p no:cacheprovider -q

step compose down
compose_down; trap - EXIT
if [ "${KEEP_IMAGES:-0}" != 1 ]; then
    podman rmi -f "$IMAGE" docker.io/library/postgres:15 docker.io/library/caddy:2 "$BASE" >/dev/null 2>&1 || true
    podman image prune -f >/dev/null
fi
step done; echo "containers: OK"
