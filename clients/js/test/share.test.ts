import assert from "node:assert/strict";
import type { ServerResponse } from "node:http";
import { test } from "node:test";

import { SsehubClient, type ShareEnvironment } from "../src/index.js";
import { LIVE, event, scripted, sse, until } from "./support.js";

/**
 * The Web Locks API's exclusive locks as the standard describes them (a queue
 * per name, `signal` to leave it, `steal` to take the lock from its holder,
 * whose request then fails), for Node, which has BroadcastChannel but no locks.
 */
class Locks {
  private held = new Map<string, object>();
  private queues = new Map<string, Array<() => void>>();

  request(name: string, options: LockOptions, callback: LockGrantedCallback<unknown>): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const holder = {};
      let stolen = false;
      const grant = (): void => {
        this.held.set(name, holder);
        this.stealers.set(holder, () => {
          stolen = true;
          reject(new DOMException("stolen", "AbortError"));
        });
        Promise.resolve()
          .then(() => callback({ name, mode: "exclusive" } as Lock))
          .then(
            (value) => !stolen && resolve(value),
            (err: unknown) => !stolen && reject(err),
          )
          .finally(() => this.release(name, holder));
      };
      if (options.steal) {
        const current = this.held.get(name);
        if (current) this.stealers.get(current)?.();
        grant();
        return;
      }
      if (!this.held.has(name)) return grant();
      const queue = this.queues.get(name) ?? [];
      this.queues.set(name, queue);
      queue.push(grant);
      options.signal?.addEventListener("abort", () => {
        const at = queue.indexOf(grant);
        if (at < 0) return;
        queue.splice(at, 1);
        reject(new DOMException("aborted", "AbortError"));
      });
    });
  }

  private stealers = new WeakMap<object, () => void>();

  private release(name: string, holder: object): void {
    if (this.held.get(name) !== holder) return;
    this.held.delete(name);
    this.queues.get(name)?.shift()?.();
  }
}

function tokenFor(sub: string): string {
  const payload = Buffer.from(JSON.stringify({ sub, scope: "access" })).toString("base64url");
  return `header.${payload}.signature`;
}

function tab(url: string, env: ShareEnvironment, sub: string) {
  const hub = new SsehubClient({ url, token: tokenFor(sub), lastEventId: 0 }, env);
  const ids: number[] = [];
  hub.on("event", (e) => ids.push(e.id));
  return { hub, ids };
}

test("tabs of one user share one stream; when its holder closes the next resumes from the last id", async () => {
  const streams: ServerResponse[] = [];
  const server = await scripted([
    (_req, res) => {
      streams.push(res);
      sse(res, LIVE, event(1), event(2));
    },
  ]);
  const env: ShareEnvironment = { locks: new Locks() as unknown as LockManager, channel: (n) => new BroadcastChannel(n) };
  const tabs = [tab(server.url, env, "7"), tab(server.url, env, "7"), tab(server.url, env, "7")];
  try {
    await until(() => tabs.every((t) => t.ids.length === 2), 5000, "the first events in every tab");
    assert.equal(server.requests.length, 1);
    assert.deepEqual(
      tabs.map((t) => t.hub.role).sort(),
      ["follower", "follower", "leader"],
    );
    sse(streams[0]!, event(3));
    await until(() => tabs.every((t) => t.ids.length === 3), 5000, "event 3 everywhere");

    const leader = tabs.find((t) => t.hub.role === "leader")!;
    leader.hub.close();
    const rest = tabs.filter((t) => t !== leader);
    await until(() => server.requests.length === 2, 5000, "the takeover's stream");
    assert.equal(server.requests[1]?.lastEventId, "3");
    // The new leader's stream replays from its position: what the others have is dropped.
    sse(streams[1]!, event(4));
    await until(() => rest.every((t) => t.ids.length === 4), 5000, "event 4 in the remaining tabs");
    for (const t of rest) assert.deepEqual(t.ids, [1, 2, 3, 4]);
    assert.deepEqual(rest.map((t) => t.hub.role).sort(), ["follower", "leader"]);
  } finally {
    for (const t of tabs) t.hub.close();
    await server.close();
  }
});

test("another user's tab never joins: it reads a stream of its own", async () => {
  const server = await scripted([(_req, res) => sse(res, LIVE, event(1))]);
  const env: ShareEnvironment = { locks: new Locks() as unknown as LockManager, channel: (n) => new BroadcastChannel(n) };
  const alice = tab(server.url, env, "1");
  const bob = tab(server.url, env, "2");
  try {
    await until(() => alice.ids.length === 1 && bob.ids.length === 1, 5000, "both streams");
    assert.equal(server.requests.length, 2);
    assert.deepEqual(
      server.requests.map((r) => r.authorization).sort(),
      [`Bearer ${tokenFor("1")}`, `Bearer ${tokenFor("2")}`],
    );
    assert.deepEqual([alice.hub.role, bob.hub.role], ["leader", "leader"]);
  } finally {
    alice.hub.close();
    bob.hub.close();
    await server.close();
  }
});
