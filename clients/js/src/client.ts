/**
 * `SsehubClient`: the events of `GET /stream`, each once and in id order,
 * across reconnects, token renewals, restores and (with `share`) tabs.
 */

import { identity } from "./identity.js";
import { ShareGroup, browserEnvironment, type Receipt, type ShareEnvironment, type TabSide } from "./share.js";
import { StreamReader, readDetail, type StreamSink } from "./stream.js";
import {
  SsehubError,
  type SsehubClientOptions,
  type SsehubEvent,
  type SsehubNotice,
  type SsehubRole,
  type SsehubStatus,
} from "./types.js";

interface Listeners {
  event: (event: SsehubEvent) => void;
  notice: (notice: SsehubNotice) => void;
  status: (status: SsehubStatus) => void;
  role: (role: SsehubRole) => void;
}
type Kind = keyof Listeners;

export class SsehubClient {
  readonly url: string;
  private readonly options: SsehubClientOptions;
  private readonly listeners: { [K in Kind]: Set<Listeners[K]> } = {
    event: new Set(),
    notice: new Set(),
    status: new Set(),
    role: new Set(),
  };
  private position: number | null;
  private currentStatus: SsehubStatus = "connecting";
  private currentRole: SsehubRole = "alone";
  private everLive = false;
  private closed = false;
  private shareKey: string | null = null;
  private group: ShareGroup | null = null;
  private reader: StreamReader | null = null;
  private readonly lifecycle: Array<() => void> = [];

  /** Starts at once; listeners added in the same task miss nothing. */
  constructor(options: SsehubClientOptions = {}, environment: ShareEnvironment | null = browserEnvironment()) {
    this.options = options;
    this.url = baseUrl(options.url);
    this.position = options.lastEventId ?? null;
    // Start after the caller had its chance to call on(): a token string and a
    // missing share environment would otherwise start synchronously.
    queueMicrotask(() => void this.start(environment));
  }

  /** The id of the last event delivered (or the position started from); null before any. */
  get lastEventId(): number | null {
    return this.position;
  }

  get status(): SsehubStatus {
    return this.currentStatus;
  }

  get role(): SsehubRole {
    return this.currentRole;
  }

  /** Listen; returns a function that stops listening. */
  on<K extends Kind>(kind: K, listener: Listeners[K]): () => void {
    this.listeners[kind].add(listener);
    return () => this.off(kind, listener);
  }

  off<K extends Kind>(kind: K, listener: Listeners[K]): void {
    this.listeners[kind].delete(listener);
  }

  /** `PUT /me/subscriptions/{channel}`: true when new. Needs an access token (or the application's cookie). */
  async subscribe(channel: string): Promise<boolean> {
    const response = await this.call("PUT", channel);
    return response.status === 201;
  }

  /** `DELETE /me/subscriptions/{channel}`. */
  async unsubscribe(channel: string): Promise<void> {
    await this.call("DELETE", channel);
  }

  /** Stop for good: no more listeners called, no reconnects; another tab takes the stream over. */
  close(): void {
    if (this.closed) return;
    this.stopSharing();
    this.reader?.close();
    this.reader = null;
    for (const remove of this.lifecycle.splice(0)) remove();
    this.setRole("closed");
    this.setStatus("closed");
    this.closed = true;
  }

  private async call(method: string, channel: string): Promise<Response> {
    const token = await this.token();
    const headers: Record<string, string> = {};
    if (token !== null) headers["Authorization"] = `Bearer ${token}`;
    const response = await fetch(`${this.url}/me/subscriptions/${encodeURIComponent(channel)}`, {
      method,
      headers,
      credentials: token === null ? "include" : "same-origin",
    });
    if (!response.ok) throw new SsehubError(response.status, await readDetail(response));
    return response;
  }

  private async token(): Promise<string | null> {
    const source = this.options.token;
    if (source === undefined) return null;
    return typeof source === "string" ? source : await source();
  }

  private async start(environment: ShareEnvironment | null): Promise<void> {
    const share = this.options.share ?? true;
    let key: string | null = null;
    if (share !== false && environment) {
      try {
        const user = await identity(this.url, await this.token(), share);
        key = user === null ? null : `ssehub-client ${this.url} ${user}`;
      } catch {
        key = null; // no token yet: the reader reports it, alone
      }
    }
    if (this.closed) return;
    this.watchLifecycle();
    this.run(key, environment);
  }

  /** Share under `key` (null: alone). */
  private run(key: string | null, environment: ShareEnvironment | null): void {
    this.shareKey = key;
    if (key !== null && environment) {
      this.group = new ShareGroup(key, this.tabSide(), environment);
      return;
    }
    this.setRole("alone");
    this.reader = this.openStream(this.position, {
      event: (event, prev) => void this.receive(event, prev),
      notice: (notice, position) => {
        if (position !== undefined) this.adopt(position, true);
        this.emit("notice", notice);
      },
      position: (position) => {
        if (this.position === null) this.adopt(position, false);
      },
      status: (status) => this.setStatus(status),
    });
  }

  private stopSharing(): void {
    this.group?.stop();
    this.group = null;
  }

  private openStream(position: number | null, sink: StreamSink): StreamReader {
    const backoff = this.options.backoff ?? {};
    return new StreamReader(
      {
        base: this.url,
        token: () => this.token(),
        from: position,
        initialBackoffMs: backoff.initialMs,
        maxBackoffMs: backoff.maxMs,
        bufferingTimeoutMs: this.options.bufferingTimeoutMs,
        accept: (token) => this.sameUser(token),
      },
      sink,
    );
  }

  /**
   * A leader's token must still be its group's user: when the application's
   * `token` now answers for another user (a logout and login), this tab
   * leaves the group and joins that user's, so no tab gets another's events.
   */
  private async sameUser(token: string | null): Promise<boolean> {
    if (this.shareKey === null || typeof this.options.share === "string") return true;
    const user = await identity(this.url, token, true);
    const key = user === null ? null : `ssehub-client ${this.url} ${user}`;
    if (key === this.shareKey || this.closed) return key === this.shareKey;
    const environment = browserEnvironment();
    this.stopSharing();
    this.run(key, environment);
    return false;
  }

  private tabSide(): TabSide {
    const client = this;
    return {
      get position() {
        return client.position;
      },
      receive: (event, prev) => this.receive(event, prev),
      adopt: (position, reset) => this.adopt(position, reset),
      notice: (notice) => this.emit("notice", notice),
      status: (status) => this.setStatus(status),
      role: (role) => this.setRole(role),
      openStream: (position, sink) => this.openStream(position, sink),
    };
  }

  /** Deliver `event` unless it was delivered already or events before it may be missing. */
  private receive(event: SsehubEvent, prev: number | null): Receipt {
    const at = this.position;
    if (at !== null && event.id <= at) return "duplicate";
    if (at !== null && (prev === null || prev > at)) return "gap";
    this.position = event.id;
    this.emit("event", event);
    return "delivered";
  }

  private adopt(position: number, reset: boolean): void {
    if (reset || this.position === null) this.position = position;
  }

  private setStatus(status: SsehubStatus): void {
    if (status === "live") this.everLive = true;
    if (status === "connecting" && this.everLive) status = "reconnecting";
    if (this.closed || status === this.currentStatus) return;
    this.currentStatus = status;
    this.emit("status", status);
  }

  private setRole(role: SsehubRole): void {
    if (this.closed || role === this.currentRole) return;
    this.currentRole = role;
    this.emit("role", role);
  }

  private emit<K extends Kind>(kind: K, value: Parameters<Listeners[K]>[0]): void {
    if (this.closed) return;
    for (const listener of [...this.listeners[kind]]) {
      try {
        (listener as (v: typeof value) => void)(value);
      } catch (err) {
        // A listener's bug must not stop delivery to the others, nor the stream.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }

  /**
   * A frozen page (Chrome's Page Lifecycle) or one kept in the back-forward
   * cache runs no code: a leader there would starve the other tabs until they
   * noticed. It hands the stream over as it goes, and comes back as a follower.
   */
  private watchLifecycle(): void {
    const doc = (globalThis as { document?: Document }).document;
    const win = (globalThis as { window?: Window }).window;
    if (!doc || !win) return;
    const pause = (): void => this.group?.pause();
    const resume = (): void => this.group?.resume();
    const hide = (e: PageTransitionEvent): void => void (e.persisted && pause());
    const show = (e: PageTransitionEvent): void => void (e.persisted && resume());
    doc.addEventListener("freeze", pause);
    doc.addEventListener("resume", resume);
    win.addEventListener("pagehide", hide);
    win.addEventListener("pageshow", show);
    this.lifecycle.push(
      () => doc.removeEventListener("freeze", pause),
      () => doc.removeEventListener("resume", resume),
      () => win.removeEventListener("pagehide", hide),
      () => win.removeEventListener("pageshow", show),
    );
  }
}

/** The base URL without a trailing slash; the page's origin by default. */
function baseUrl(url: string | undefined): string {
  const origin = (globalThis as { location?: Location }).location?.origin;
  const base = url ?? origin;
  if (!base) throw new TypeError("SsehubClient needs options.url outside a browser page");
  return new URL(base, origin).href.replace(/\/+$/, "");
}
