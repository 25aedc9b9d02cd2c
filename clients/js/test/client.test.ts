import assert from "node:assert/strict";
import { test } from "node:test";

import { SsehubClient, backoffDelay, type SsehubNotice, type SsehubStatus } from "../src/index.js";
import { HEAD_PROBE } from "../src/stream.js";
import { LIVE, event, notice, scripted, sse, until } from "./support.js";

/** A client with sharing off (Node has no Web Locks anyway), recording what it emits. */
function client(url: string, options: ConstructorParameters<typeof SsehubClient>[0] = {}) {
  const hub = new SsehubClient({ url, share: false, backoff: { initialMs: 20, maxMs: 100 }, ...options });
  const ids: number[] = [];
  const notices: SsehubNotice[] = [];
  const statuses: SsehubStatus[] = [];
  hub.on("event", (e) => ids.push(e.id));
  hub.on("notice", (n) => notices.push(n));
  hub.on("status", (s) => statuses.push(s));
  return { hub, ids, notices, statuses };
}

test("backoff doubles up to its cap, with jitter in the upper half", () => {
  assert.equal(backoffDelay(0, 1000, 30_000, () => 0), 500);
  assert.equal(backoffDelay(0, 1000, 30_000, () => 1), 1000);
  assert.equal(backoffDelay(3, 1000, 30_000, () => 1), 8000);
  assert.equal(backoffDelay(10, 1000, 30_000, () => 1), 30_000);
  assert.equal(backoffDelay(10, 1000, 30_000, () => 0), 15_000);
  assert.equal(backoffDelay(1000, 1000, 30_000, () => 0.5), 22_500);
  const spread = new Set(Array.from({ length: 50 }, () => backoffDelay(2, 1000, 30_000)));
  assert.ok(spread.size > 40, "jitter spreads reconnects");
  for (const ms of spread) assert.ok(ms >= 2000 && ms <= 4000);
});

test("a dropped stream reconnects from the last id; replayed ids are not delivered twice", async () => {
  const server = await scripted([
    (_req, res) => {
      sse(res, LIVE, event(1), event(2));
      res.end();
    },
    (_req, res) => sse(res, event(1), event(2), LIVE, event(3)), // a replay overlapping what it had
  ]);
  const { hub, ids, statuses } = client(server.url, { lastEventId: 0 });
  try {
    await until(() => ids.length === 3, 5000, "three events");
    assert.deepEqual(ids, [1, 2, 3]);
    assert.deepEqual(
      server.requests.map((r) => r.lastEventId),
      ["0", "2"],
    );
    assert.deepEqual(statuses, ["live", "reconnecting", "live"]);
    assert.equal(hub.lastEventId, 3);
  } finally {
    hub.close();
    await server.close();
  }
  assert.deepEqual(statuses.at(-1), "closed");
});

test("failures back off with growing delays, and the refusal is reported", async () => {
  const server = await scripted([
    (_req, res) => res.writeHead(503, { "content-type": "application/json" }).end('{"detail":"database away"}'),
    (_req, res) => res.writeHead(503).end(),
    (_req, res) => res.writeHead(503).end(),
    (_req, res) => sse(res, LIVE, event(5)),
  ]);
  const { hub, ids, notices } = client(server.url, { lastEventId: 4, backoff: { initialMs: 100, maxMs: 1000 } });
  try {
    await until(() => ids.length === 1, 5000, "the event after the failures");
    const gaps = server.requests.slice(1).map((r, i) => r.at - server.requests[i]!.at);
    assert.ok(gaps[0]! >= 45 && gaps[1]! >= 95 && gaps[2]! >= 195, `delays ${gaps}`);
    const errors = notices.filter((n) => n.type === "ssehub-client.error");
    assert.deepEqual(errors[0]?.data, { status: 503, detail: "database away" });
    assert.equal(errors.length, 3);
  } finally {
    hub.close();
    await server.close();
  }
});

test("on ssehub.expired it asks for a new token and resumes at once from its last id", async () => {
  const server = await scripted([
    (_req, res) => {
      sse(res, LIVE, event(10), notice("ssehub.expired"));
      res.end();
    },
    (_req, res) => sse(res, LIVE, event(11)),
  ]);
  let issued = 0;
  const { hub, ids, notices } = client(server.url, {
    lastEventId: 9,
    token: async () => `token-${++issued}`,
    backoff: { initialMs: 60_000 }, // a backoff would time the test out
  });
  try {
    await until(() => ids.length === 2, 5000, "the event after expiry");
    assert.deepEqual(ids, [10, 11]);
    assert.deepEqual(
      server.requests.map((r) => [r.authorization, r.lastEventId]),
      [
        ["Bearer token-1", "9"],
        ["Bearer token-2", "10"],
      ],
    );
    assert.ok(notices.some((n) => n.type === "ssehub.expired"));
  } finally {
    hub.close();
    await server.close();
  }
});

test("ssehub.reset moves the position down to the server's, and later events arrive", async () => {
  const server = await scripted([
    (_req, res) => {
      sse(res, notice("ssehub.reset", { last_event_id: 5 }), LIVE, event(6));
      res.end();
    },
    (_req, res) => sse(res, LIVE, event(7)),
  ]);
  const { hub, ids, notices } = client(server.url, { lastEventId: 2 ** 50 });
  try {
    await until(() => ids.length === 2, 5000, "events after the reset");
    assert.deepEqual(ids, [6, 7]);
    assert.deepEqual(
      notices.filter((n) => n.type === "ssehub.reset").map((n) => n.data),
      [{ last_event_id: 5 }],
    );
    assert.deepEqual(
      server.requests.map((r) => r.lastEventId),
      [String(2 ** 50), "6"],
    );
  } finally {
    hub.close();
    await server.close();
  }
});

test("with no position it asks for the server's and resumes from there after a drop", async () => {
  const server = await scripted([
    (_req, res) => {
      // What ssehub answers to a position above its head: its position, then live.
      sse(res, notice("ssehub.reset", { last_event_id: 30 }), LIVE);
      res.end();
    },
    (_req, res) => sse(res, LIVE, event(31)),
  ]);
  const { hub, ids, notices } = client(server.url);
  try {
    await until(() => ids.length === 1, 5000, "the event after the drop");
    assert.deepEqual(
      server.requests.map((r) => r.lastEventId),
      [HEAD_PROBE, "30"],
    );
    assert.equal(hub.lastEventId, 31);
    assert.ok(!notices.some((n) => n.type === "ssehub.reset"), "its own probe is not the application's reset");
  } finally {
    hub.close();
    await server.close();
  }
});

test("a 200 stream that delivers no byte is reported as a buffering proxy", async () => {
  const server = await scripted([
    (_req, res) => {
      res.writeHead(200, { "content-type": "text/event-stream" });
      res.flushHeaders(); // the head passes, the body is held back
    },
  ]);
  const { hub, notices } = client(server.url, { lastEventId: 1, bufferingTimeoutMs: 200 });
  try {
    await until(() => notices.length > 0, 5000, "a notice");
    assert.equal(notices[0]?.type, "ssehub-client.buffering");
    assert.match(String(notices[0]?.data["message"]), /a proxy is buffering text\/event-stream/);
  } finally {
    hub.close();
    await server.close();
  }
});

test("a stream whose first bytes arrive is not reported as buffered", async () => {
  const server = await scripted([(_req, res) => sse(res)]); // only the retry line: a quiet stream
  const { hub, notices } = client(server.url, { lastEventId: 1, bufferingTimeoutMs: 100 });
  try {
    await new Promise((resolve) => setTimeout(resolve, 400));
    assert.deepEqual(notices, []);
  } finally {
    hub.close();
    await server.close();
  }
});

test("close stops reconnecting and delivering", async () => {
  const server = await scripted([
    (_req, res) => {
      sse(res, LIVE, event(1));
      res.end();
    },
  ]);
  const { hub, ids, statuses } = client(server.url, { lastEventId: 0 });
  await until(() => ids.length === 1, 5000, "the first event");
  hub.close();
  const seen = server.requests.length;
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(server.requests.length, seen);
  assert.equal(statuses.at(-1), "closed");
  assert.equal(hub.role, "closed");
  await server.close();
});
