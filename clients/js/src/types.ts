/** An event as ssehub stores and streams it. */
export interface SsehubEvent<Data = unknown> {
  /** Unique across all channels; ids only grow in the order events become visible. */
  id: number;
  channel: string;
  type: string;
  data: Data;
  /** ISO 8601, UTC. */
  published_at: string;
}

/**
 * A notice: the server's `ssehub.*` frames (`ssehub.live`, `ssehub.truncated`,
 * `ssehub.expired`, `ssehub.channel_removed`, `ssehub.reset`, presence...), and
 * the client's own `ssehub-client.*` ones:
 * - `ssehub-client.buffering` `{message, waited_ms}`: the stream answered 200 but
 *   no byte arrived although ssehub sends its first bytes at once;
 * - `ssehub-client.error` `{status, detail}`: the stream was refused (status 0:
 *   no token could be had) and will be tried again with backoff.
 */
export interface SsehubNotice {
  type: string;
  data: Record<string, unknown>;
}

export type SsehubStatus = "connecting" | "live" | "reconnecting" | "closed";

/**
 * Which part this client plays: `leader` reads the stream for every tab of its
 * user, `follower` gets events from the leader, `alone` reads a stream of its
 * own (sharing off or impossible), `closed` after close().
 */
export type SsehubRole = "leader" | "follower" | "alone" | "closed";

/** A token, or a function (sync or async) asked again before every connection. */
export type TokenSource = string | (() => string | Promise<string>);

export interface SsehubClientOptions {
  /** ssehub's base URL, e.g. "https://push.example.com". Default: the page's origin. */
  url?: string;
  /**
   * Sent as `Authorization: Bearer`. Omitted: the `ssehub_stream` cookie
   * (POST /auth/stream-cookie) is sent instead, also to another origin.
   */
  token?: TokenSource;
  /**
   * true (default): all tabs of this origin and user share one stream.
   * A string: share with the tabs that pass the same string (for the cookie,
   * whose user a script cannot read: pass the user's id).
   * false: this client reads a stream of its own.
   */
  share?: boolean | string;
  /** Start after this event id; default: from now. */
  lastEventId?: number | null;
  /** Reconnect delays: doubling from initialMs (default: the server's `retry:`) up to maxMs (30 s), with jitter. */
  backoff?: { initialMs?: number; maxMs?: number };
  /** How long a 200 stream may stay silent before `ssehub-client.buffering` (default 5000 ms). */
  bufferingTimeoutMs?: number;
}

/** What a refused API call (subscribe, unsubscribe) throws. */
export class SsehubError extends Error {
  constructor(
    readonly status: number,
    readonly detail: unknown,
  ) {
    super(`ssehub answered ${status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    this.name = "SsehubError";
  }
}
