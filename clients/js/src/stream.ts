/**
 * One reader of `GET /stream`: fetch, parse, reconnect with backoff, follow
 * `ssehub.expired` and `ssehub.reset`, and notice a buffering proxy.
 *
 * Why fetch and not EventSource, in browsers too: the token goes in the
 * `Authorization` header, never in a URL (access logs, history); every byte
 * that arrives is seen, which is how a proxy that buffers `text/event-stream`
 * is told apart from a quiet stream; a refused connection shows its status
 * (EventSource gives up on any non-200 without saying which); and reconnects
 * are ours, so each one asks for a fresh token and resumes from our own
 * position. The stream cookie works the same with `credentials: "include"`,
 * what EventSource's `withCredentials` does.
 *
 * The reader keeps a cursor: the id of the last event it passed on (or the
 * position it resumed from). Every event goes out with the cursor before it
 * (`prev`), so whoever relays the events can prove there is no gap: the server
 * sends everything after the position asked for, in id order.
 */

import { SseParser, type SseFrame } from "./parser.js";
import type { SsehubEvent, SsehubNotice } from "./types.js";

/** What a reader reports to. */
export interface StreamSink {
  /** An event, and the reader's cursor before it (null: not known). */
  event(event: SsehubEvent, prev: number | null): void;
  /** A notice; for `ssehub.reset`, `position` is the new position. */
  notice(notice: SsehubNotice, position?: number): void;
  /** The position became known without an event (see `HEAD_PROBE`). */
  position(position: number): void;
  status(status: "connecting" | "live" | "reconnecting"): void;
}

export interface StreamOptions {
  /** ssehub's base URL, without a trailing slash. */
  base: string;
  /** A token for the `Authorization` header, or null for the stream cookie. */
  token: () => Promise<string | null>;
  /** Where to resume from; null: from now. */
  from: number | null;
  initialBackoffMs?: number | undefined;
  maxBackoffMs?: number | undefined;
  bufferingTimeoutMs?: number | undefined;
  /** Called before a token's stream opens: false stops the reader (the user changed). */
  accept?: (token: string | null) => Promise<boolean>;
}

/**
 * Above every id a database can issue: a stream asked to resume from there
 * answers `ssehub.reset` with the server's position and goes on from it. A
 * stream opened with no position starts "now" but says nowhere where now is;
 * this way the reader learns a concrete position at once, so a reconnect or
 * a takeover after a quiet spell misses nothing published in between.
 */
export const HEAD_PROBE = "9223372036854775807";
export const DEFAULT_BUFFERING_TIMEOUT_MS = 5000;
const DEFAULT_INITIAL_BACKOFF_MS = 1000;
const DEFAULT_MAX_BACKOFF_MS = 30_000;
const DETAIL_BYTES = 2048;

/**
 * The delay before reconnect attempt `attempt` (0 first): doubling from
 * `initialMs` up to `maxMs`, then a random point in its upper half ("equal
 * jitter"), so that clients dropped together by a restart do not come back
 * together, and none retries sooner than half the step.
 */
export function backoffDelay(
  attempt: number,
  initialMs: number,
  maxMs: number,
  random: () => number = Math.random,
): number {
  const step = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 32));
  return step / 2 + (random() * step) / 2;
}

type Outcome = "failed" | "again";

export class StreamReader {
  private cursor: number | null;
  private closed = false;
  private attempt = 0;
  private everLive = false;
  private serverRetryMs: number | undefined;
  private controller: AbortController | null = null;
  private wake: (() => void) | null = null;

  constructor(
    private readonly options: StreamOptions,
    private readonly sink: StreamSink,
  ) {
    this.cursor = options.from;
    void this.run();
  }

  /** The id of the last event passed on, or the position resumed from. */
  get position(): number | null {
    return this.cursor;
  }

  /** Drop the connection and resume from `position` at once (no backoff). */
  restartFrom(position: number): void {
    this.cursor = position;
    this.attempt = 0;
    this.controller?.abort();
    this.wake?.();
  }

  close(): void {
    this.closed = true;
    this.controller?.abort();
    this.wake?.();
  }

  private async run(): Promise<void> {
    while (!this.closed) {
      this.sink.status(this.everLive ? "reconnecting" : "connecting");
      const outcome = await this.connectOnce();
      if (this.closed) return;
      if (outcome === "failed") await this.sleep(this.delay(this.attempt++));
    }
  }

  private delay(attempt: number): number {
    const initial = this.options.initialBackoffMs ?? this.serverRetryMs ?? DEFAULT_INITIAL_BACKOFF_MS;
    return backoffDelay(attempt, initial, this.options.maxBackoffMs ?? DEFAULT_MAX_BACKOFF_MS);
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      const self = this;
      function done(): void {
        clearTimeout(timer);
        self.wake = null;
        resolve();
      }
      this.wake = done;
    });
  }

  private error(status: number, detail: unknown): void {
    this.sink.notice({ type: "ssehub-client.error", data: { status, detail } });
  }

  /** One connection, from token to end of stream. "again": reconnect at once. */
  private async connectOnce(): Promise<Outcome> {
    const controller = new AbortController();
    this.controller = controller;
    let token: string | null;
    try {
      token = await this.options.token();
    } catch (err) {
      this.error(0, `no token: ${String(err)}`);
      return "failed";
    }
    if (this.options.accept && !(await this.options.accept(token))) {
      this.close();
      return "again";
    }
    if (this.closed || controller.signal.aborted) return "again";
    const probing = this.cursor === null;
    const url = `${this.options.base}/stream?last_event_id=${probing ? HEAD_PROBE : this.cursor}`;
    const headers: Record<string, string> = { Accept: "text/event-stream" };
    if (token !== null) headers["Authorization"] = `Bearer ${token}`;
    let response: Response;
    try {
      response = await fetch(url, {
        headers,
        // The cookie only when there is no token: a token names its user, the
        // cookie would be a second, maybe different, identity.
        credentials: token === null ? "include" : "same-origin",
        cache: "no-store",
        signal: controller.signal,
      });
    } catch {
      return controller.signal.aborted ? "again" : "failed";
    }
    const type = response.headers.get("content-type") ?? "";
    if (response.status !== 200 || !type.startsWith("text/event-stream") || !response.body) {
      this.error(response.status, await readDetail(response));
      return "failed";
    }
    return this.read(response.body, controller, probing);
  }

  private async read(
    body: ReadableStream<Uint8Array>,
    controller: AbortController,
    probing: boolean,
  ): Promise<Outcome> {
    let expired = false;
    let swallowReset = probing;
    const onFrame = (frame: SseFrame): void => {
      if (controller.signal.aborted) return; // restarted or closed: the rest is stale
      if (frame.id !== undefined && frame.id !== "") {
        this.onEvent(frame);
        return;
      }
      const notice = { type: frame.event, data: parseObject(frame.data) };
      if (notice.type === "ssehub.reset") {
        const position = notice.data["last_event_id"];
        if (typeof position !== "number" || !Number.isSafeInteger(position)) return;
        this.cursor = position;
        if (swallowReset) this.sink.position(position); // the answer to HEAD_PROBE
        else this.sink.notice(notice, position);
        swallowReset = false;
        return;
      }
      if (notice.type === "ssehub.live") {
        this.attempt = 0;
        this.everLive = true;
        this.sink.status("live");
      } else if (notice.type === "ssehub.expired") {
        expired = true; // the server ends the stream now: a new token, and on at once
      }
      this.sink.notice(notice);
    };
    const parser = new SseParser(onFrame, (ms) => {
      this.serverRetryMs = ms;
    });
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let silent = true;
    const waitMs = this.options.bufferingTimeoutMs ?? DEFAULT_BUFFERING_TIMEOUT_MS;
    // ssehub writes its `retry:` line as soon as the stream is registered: a 200
    // whose body stays empty this long is held back on the way.
    const buffering = setTimeout(() => {
      if (!silent || controller.signal.aborted) return;
      this.sink.notice({
        type: "ssehub-client.buffering",
        data: {
          message:
            `The stream answered 200 but no byte arrived in ${waitMs} ms, although ssehub sends its first ` +
            "bytes at once: a proxy is buffering text/event-stream (nginx: proxy_buffering off, or honour " +
            "X-Accel-Buffering; a CDN: disable buffering for this path). Events arrive late or never.",
          waited_ms: waitMs,
        },
      });
    }, waitMs);
    const abort = (): void => void reader.cancel().catch(() => {});
    controller.signal.addEventListener("abort", abort);
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        if (value.length > 0) silent = false;
        parser.push(decoder.decode(value, { stream: true }));
      }
    } catch {
      // the connection broke, or we aborted it
    } finally {
      clearTimeout(buffering);
      controller.signal.removeEventListener("abort", abort);
    }
    if (controller.signal.aborted || expired) return "again";
    controller.abort();
    return "failed";
  }

  private onEvent(frame: SseFrame): void {
    const id = Number(frame.id);
    if (!Number.isSafeInteger(id) || id <= 0) return;
    const prev = this.cursor;
    if (prev !== null && id <= prev) return; // never backwards, whatever arrives
    let event: SsehubEvent;
    try {
      event = JSON.parse(frame.data) as SsehubEvent;
    } catch {
      return;
    }
    this.cursor = id;
    this.sink.event(event, prev);
  }
}

function parseObject(text: string): Record<string, unknown> {
  try {
    const value: unknown = JSON.parse(text);
    return typeof value === "object" && value !== null && !Array.isArray(value)
      ? (value as Record<string, unknown>)
      : { value };
  } catch {
    return { text };
  }
}

/** `{"detail": ...}` of an error answer, or its first bytes as text. */
export async function readDetail(response: Response): Promise<unknown> {
  try {
    const text = (await response.text()).slice(0, DETAIL_BYTES);
    try {
      const body = JSON.parse(text) as { detail?: unknown };
      return body.detail ?? body;
    } catch {
      return text || response.statusText;
    }
  } catch {
    return response.statusText;
  }
}
