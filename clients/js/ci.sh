#!/usr/bin/env bash
# CI for the browser client: install from the lock file, check types, build,
# run the unit tests, check that the module ssehub serves (app/static) is this
# build, then pack it and install the tarball into an empty project that
# imports it from Node and type-checks against its declarations.
set -euo pipefail
cd "$(dirname "$0")"
export npm_config_fund=false npm_config_audit=false npm_config_update_notifier=false

npm ci
npx tsc -p tsconfig.json --noEmit
npx tsc -p tsconfig.test.json --noEmit
npm run build
npm test

if ! cmp -s dist/ssehub-client.js ../../app/static/ssehub-client.js; then
    echo "app/static/ssehub-client.js is not the build of clients/js: run 'npm run static' there and commit it" >&2
    exit 1
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
tarball=$(npm pack --silent --pack-destination "$scratch" | tail -n 1)
tar -tzf "$scratch/$tarball" | sort
mkdir "$scratch/app"
cd "$scratch/app"
npm init -y >/dev/null
npm install --silent --no-save "$scratch/$tarball" "typescript@$(node -p 'require(process.argv[1]).version' "$OLDPWD/node_modules/typescript/package.json")"
node --input-type=module -e '
import { SsehubClient, SseParser, SsehubError } from "ssehub-client";
const frames = [];
new SseParser((f) => frames.push(f)).push("id: 1\ndata: {}\n\n");
if (frames.length !== 1 || typeof SsehubClient !== "function" || typeof SsehubError !== "function") process.exit(1);
const hub = new SsehubClient({ url: "http://127.0.0.1:9", lastEventId: 0, backoff: { initialMs: 60000 } });
hub.close();
if (hub.status !== "closed") process.exit(1);
console.log("ssehub-client imports and runs in Node", process.version);
'
cat > check.ts <<'TS'
import { SsehubClient, type SsehubEvent, type SsehubStatus } from "ssehub-client";
const hub = new SsehubClient({ url: "https://push.example.com", token: async () => "t", share: true });
const off: () => void = hub.on("event", (ev: SsehubEvent) => console.log(ev.id + 1, ev.channel.length));
hub.on("status", (s: SsehubStatus) => s === "live");
const position: number | null = hub.lastEventId;
const created: Promise<boolean> = hub.subscribe("orders");
// @ts-expect-error: the kinds are event, notice, status and role
hub.on("message", () => {});
void [off, position, created];
hub.close();
TS
npx tsc --noEmit --strict --module nodenext --moduleResolution nodenext --target es2022 --lib es2022,dom check.ts
echo "ssehub-client: the packed tarball installs, imports and type-checks"
