// ssehub-client 0.1.0: built from clients/js by `npm run build`; do not edit.

// src/identity.ts
function jwtIdentity(token) {
  const parts = token.split(".");
  if (parts.length !== 3 || !parts[1]) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = new TextDecoder().decode(
      Uint8Array.from(atob(b64 + "=".repeat((4 - b64.length % 4) % 4)), (c) => c.charCodeAt(0))
    );
    const claims = JSON.parse(json);
    if (typeof claims.sub !== "string" || claims.sub === "") return null;
    return `${typeof claims.iss === "string" ? claims.iss : ""}|${claims.sub}`;
  } catch {
    return null;
  }
}
async function apiIdentity(base, token) {
  try {
    const response = await fetch(`${base}/users/me`, {
      headers: { Authorization: `Bearer ${token}` },
      cache: "no-store"
    });
    if (!response.ok) return null;
    const me = await response.json();
    return typeof me.id === "number" || typeof me.id === "string" ? `user|${me.id}` : null;
  } catch {
    return null;
  }
}
async function identity(base, token, share) {
  if (typeof share === "string") return `app|${share}`;
  if (token === null) return null;
  return jwtIdentity(token) ?? await apiIdentity(base, token);
}

// src/share.ts
var BEAT_MS = 400;
var SILENCE_MS = 600;
var PING_WAIT_MS = 600;
var WATCH_MS = 200;
var LOG_SIZE = 1e3;
var NEED_EVERY_MS = 1e3;
function browserEnvironment() {
  const locks = globalThis.navigator?.locks;
  if (!locks || typeof globalThis.BroadcastChannel !== "function") return null;
  return { locks, channel: (name) => new BroadcastChannel(name) };
}
var ShareGroup = class {
  constructor(key, tab, env) {
    this.key = key;
    this.tab = tab;
    this.env = env;
    this.channel = env.channel(key);
    this.channel.onmessage = (e) => this.onMessage(e.data);
    this.watchdog = setInterval(() => this.watch(), WATCH_MS);
    this.join();
  }
  key;
  tab;
  env;
  me = Math.random().toString(36).slice(2) + Date.now().toString(36);
  channel;
  term = 0;
  heardAt = Date.now();
  pingAt = null;
  neededAt = 0;
  generation = 0;
  waiting = null;
  stopped = false;
  paused = false;
  watchdog;
  // while leading:
  reader = null;
  release = null;
  beat;
  status = "connecting";
  log = [];
  get leading() {
    return this.reader !== null;
  }
  /** Leave for good: the next tab in line takes the lock at once. */
  stop() {
    this.stopped = true;
    this.leave();
    clearInterval(this.watchdog);
    this.channel.close();
  }
  /** The page is frozen or put in the back-forward cache: let another tab lead meanwhile. */
  pause() {
    if (this.stopped || this.paused) return;
    this.paused = true;
    this.leave();
  }
  resume() {
    if (this.stopped || !this.paused) return;
    this.paused = false;
    this.join();
  }
  join() {
    this.heardAt = Date.now();
    this.pingAt = null;
    this.tab.role("follower");
    this.post({ t: "hello", from: this.me, pos: this.tab.position });
    this.candidate(false);
  }
  leave() {
    this.generation++;
    this.waiting?.abort();
    this.waiting = null;
    if (this.leading) this.stepDown();
  }
  post(message) {
    if (!this.stopped) this.channel.postMessage(message);
  }
  /** Wait in line for the lock, or (`steal`) take it from a leader that stopped answering. */
  candidate(steal) {
    const generation = ++this.generation;
    this.waiting?.abort();
    const waiting = steal ? null : new AbortController();
    this.waiting = waiting;
    const options = waiting ? { signal: waiting.signal } : { steal: true };
    this.env.locks.request(this.key, options, () => generation === this.generation ? this.lead() : void 0).catch(() => void 0).finally(() => {
      if (generation !== this.generation) return;
      if (this.leading) this.stepDown();
      if (!this.stopped && !this.paused) this.candidate(false);
    });
  }
  /** Holds the lock until the returned promise settles. */
  lead() {
    this.term = Math.max(this.term + 1, Date.now() * 1e3 + Math.floor(Math.random() * 1e3));
    this.waiting = null;
    this.log = [];
    this.status = "connecting";
    this.tab.role("leader");
    this.reader = this.tab.openStream(this.tab.position, this.sink());
    this.sendBeat();
    this.beat = setInterval(() => this.sendBeat(), BEAT_MS);
    return new Promise((resolve) => {
      this.release = resolve;
    });
  }
  stepDown() {
    this.reader?.close();
    this.reader = null;
    clearInterval(this.beat);
    this.release?.();
    this.release = null;
    this.heardAt = Date.now();
    this.pingAt = null;
    this.tab.role(this.stopped ? "closed" : "follower");
  }
  sendBeat() {
    const pos = this.reader?.position ?? null;
    this.post({ t: "beat", term: this.term, from: this.me, pos, status: this.status });
  }
  /** The leader's stream: relayed to every tab, and delivered here. */
  sink() {
    const current = () => this.leading && !this.stopped;
    return {
      event: (event, prev) => {
        if (!current()) return;
        this.log.push({ prev, event });
        if (this.log.length > LOG_SIZE) this.log.shift();
        this.post({ t: "event", term: this.term, prev, event });
        if (this.tab.receive(event, prev) === "gap") this.restart(this.tab.position);
      },
      notice: (notice, pos) => {
        if (!current()) return;
        if (pos !== void 0) {
          this.log = [];
          this.tab.adopt(pos, true);
        }
        this.post(pos === void 0 ? { t: "notice", term: this.term, notice } : { t: "notice", term: this.term, notice, pos });
        this.tab.notice(notice);
      },
      position: (pos) => {
        if (!current()) return;
        if (this.tab.position === null) this.tab.adopt(pos, false);
        this.sendBeat();
      },
      status: (status) => {
        if (!current()) return;
        this.status = status;
        this.tab.status(status);
        this.sendBeat();
      }
    };
  }
  /** Resume the stream from `pos`: the server replays, the tabs drop what they have. */
  restart(pos) {
    if (pos === null || !this.reader) return;
    this.log = [];
    this.reader.restartFrom(pos);
  }
  onMessage(m) {
    if (this.stopped || this.paused || typeof m !== "object" || m === null) return;
    if ("term" in m) {
      if (m.term < this.term) return;
      if (m.term > this.term) {
        this.term = m.term;
        if (this.leading) this.stepDown();
      }
      if (this.leading) return;
      this.heardAt = Date.now();
      this.pingAt = null;
    }
    switch (m.t) {
      case "hello":
        if (this.leading) {
          this.sendBeat();
          if (m.pos !== null) this.serve(m.from, m.pos);
        }
        break;
      case "need":
        if (this.leading) this.serve(m.from, m.pos);
        break;
      case "ping":
        if (this.leading) this.sendBeat();
        else this.pingAt ??= Date.now();
        break;
      case "beat":
        this.tab.status(m.status);
        if (m.pos === null) break;
        if (this.tab.position === null) this.tab.adopt(m.pos, false);
        else if (m.pos > this.tab.position) this.ask();
        break;
      case "event":
        if (this.tab.receive(m.event, m.prev) === "gap") this.ask();
        break;
      case "notice":
        if (m.pos !== void 0) this.tab.adopt(m.pos, true);
        this.tab.notice(m.notice);
        break;
      case "catchup":
        if (m.to !== this.me) break;
        for (const { prev, event } of m.events) {
          if (this.tab.receive(event, prev) === "gap") {
            this.ask();
            break;
          }
        }
        break;
      default:
    }
  }
  /** A follower misses events after its position: tell the leader. */
  ask() {
    const pos = this.tab.position;
    const now = Date.now();
    if (pos === null || now - this.neededAt < NEED_EVERY_MS) return;
    this.neededAt = now;
    this.post({ t: "need", from: this.me, pos });
  }
  /** Leader: bring tab `to`, at `pos`, up to date, from the log if it reaches back that far. */
  serve(to, pos) {
    const head = this.reader?.position ?? null;
    if (head !== null && pos >= head) return;
    const first = this.log[0];
    if (head !== null && first && first.prev !== null && first.prev <= pos) {
      const events = this.log.filter((r) => r.event.id > pos);
      this.post({ t: "catchup", term: this.term, to, events });
    } else {
      this.restart(pos);
    }
  }
  /** Follower: a leader that stops answering is frozen or hung: take its place. */
  watch() {
    if (this.stopped || this.paused || this.leading) return;
    const now = Date.now();
    if (now - this.heardAt < SILENCE_MS) return;
    if (this.pingAt === null) {
      this.pingAt = now;
      this.post({ t: "ping", from: this.me });
    } else if (now - this.pingAt > PING_WAIT_MS) {
      this.heardAt = now;
      this.pingAt = null;
      this.candidate(true);
    }
  }
};

// src/parser.ts
var SseParser = class {
  /**
   * @param onFrame called for every frame that has data, in order.
   * @param onRetry called with a `retry:` field's milliseconds (digits only, as the standard says).
   */
  constructor(onFrame, onRetry = () => {
  }) {
    this.onFrame = onFrame;
    this.onRetry = onRetry;
  }
  onFrame;
  onRetry;
  rest = "";
  afterCR = false;
  started = false;
  data = [];
  event = "";
  id = void 0;
  /** Feed the next piece of decoded text. */
  push(text) {
    if (!this.started) {
      if (text === "") return;
      this.started = true;
      if (text.charCodeAt(0) === 65279) text = text.slice(1);
    }
    let start = 0;
    if (this.afterCR && text.charCodeAt(0) === 10) start = 1;
    this.afterCR = false;
    for (let i = start; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      const line = this.rest + text.slice(start, i);
      this.rest = "";
      if (c === 13) {
        if (i + 1 === text.length) this.afterCR = true;
        else if (text.charCodeAt(i + 1) === 10) i++;
      }
      start = i + 1;
      this.line(line);
    }
    this.rest += text.slice(start);
  }
  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.charCodeAt(0) === 58) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.charCodeAt(0) === 32) value = value.slice(1);
    switch (field) {
      case "data":
        this.data.push(value);
        break;
      case "event":
        this.event = value;
        break;
      case "id":
        if (!value.includes("\0")) this.id = value;
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) this.onRetry(Number(value));
        break;
      default:
    }
  }
  dispatch() {
    const frame = { id: this.id, event: this.event || "message", data: this.data.join("\n") };
    const hasData = this.data.length > 0;
    this.data = [];
    this.event = "";
    this.id = void 0;
    if (hasData) this.onFrame(frame);
  }
};

// src/stream.ts
var HEAD_PROBE = "9223372036854775807";
var DEFAULT_BUFFERING_TIMEOUT_MS = 5e3;
var DEFAULT_INITIAL_BACKOFF_MS = 1e3;
var DEFAULT_MAX_BACKOFF_MS = 3e4;
var DETAIL_BYTES = 2048;
function backoffDelay(attempt, initialMs, maxMs, random = Math.random) {
  const step = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 32));
  return step / 2 + random() * step / 2;
}
var StreamReader = class {
  constructor(options, sink) {
    this.options = options;
    this.sink = sink;
    this.cursor = options.from;
    void this.run();
  }
  options;
  sink;
  cursor;
  closed = false;
  attempt = 0;
  everLive = false;
  serverRetryMs;
  controller = null;
  wake = null;
  /** The id of the last event passed on, or the position resumed from. */
  get position() {
    return this.cursor;
  }
  /** Drop the connection and resume from `position` at once (no backoff). */
  restartFrom(position) {
    this.cursor = position;
    this.attempt = 0;
    this.controller?.abort();
    this.wake?.();
  }
  close() {
    this.closed = true;
    this.controller?.abort();
    this.wake?.();
  }
  async run() {
    while (!this.closed) {
      this.sink.status(this.everLive ? "reconnecting" : "connecting");
      const outcome = await this.connectOnce();
      if (this.closed) return;
      if (outcome === "failed") await this.sleep(this.delay(this.attempt++));
    }
  }
  delay(attempt) {
    const initial = this.options.initialBackoffMs ?? this.serverRetryMs ?? DEFAULT_INITIAL_BACKOFF_MS;
    return backoffDelay(attempt, initial, this.options.maxBackoffMs ?? DEFAULT_MAX_BACKOFF_MS);
  }
  sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      const self = this;
      function done() {
        clearTimeout(timer);
        self.wake = null;
        resolve();
      }
      this.wake = done;
    });
  }
  error(status, detail) {
    this.sink.notice({ type: "ssehub-client.error", data: { status, detail } });
  }
  /** One connection, from token to end of stream. "again": reconnect at once. */
  async connectOnce() {
    const controller = new AbortController();
    this.controller = controller;
    let token;
    try {
      token = await this.options.token();
    } catch (err) {
      this.error(0, `no token: ${String(err)}`);
      return "failed";
    }
    if (this.options.accept && !await this.options.accept(token)) {
      this.close();
      return "again";
    }
    if (this.closed || controller.signal.aborted) return "again";
    const probing = this.cursor === null;
    const url = `${this.options.base}/stream?last_event_id=${probing ? HEAD_PROBE : this.cursor}`;
    const headers = { Accept: "text/event-stream" };
    if (token !== null) headers["Authorization"] = `Bearer ${token}`;
    let response;
    try {
      response = await fetch(url, {
        headers,
        // The cookie only when there is no token: a token names its user, the
        // cookie would be a second, maybe different, identity.
        credentials: token === null ? "include" : "same-origin",
        cache: "no-store",
        signal: controller.signal
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
  async read(body, controller, probing) {
    let expired = false;
    let swallowReset = probing;
    const onFrame = (frame) => {
      if (controller.signal.aborted) return;
      if (frame.id !== void 0 && frame.id !== "") {
        this.onEvent(frame);
        return;
      }
      const notice = { type: frame.event, data: parseObject(frame.data) };
      if (notice.type === "ssehub.reset") {
        const position = notice.data["last_event_id"];
        if (typeof position !== "number" || !Number.isSafeInteger(position)) return;
        this.cursor = position;
        if (swallowReset) this.sink.position(position);
        else this.sink.notice(notice, position);
        swallowReset = false;
        return;
      }
      if (notice.type === "ssehub.live") {
        this.attempt = 0;
        this.everLive = true;
        this.sink.status("live");
      } else if (notice.type === "ssehub.expired") {
        expired = true;
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
    const buffering = setTimeout(() => {
      if (!silent || controller.signal.aborted) return;
      this.sink.notice({
        type: "ssehub-client.buffering",
        data: {
          message: `The stream answered 200 but no byte arrived in ${waitMs} ms, although ssehub sends its first bytes at once: a proxy is buffering text/event-stream (nginx: proxy_buffering off, or honour X-Accel-Buffering; a CDN: disable buffering for this path). Events arrive late or never.`,
          waited_ms: waitMs
        }
      });
    }, waitMs);
    const abort = () => void reader.cancel().catch(() => {
    });
    controller.signal.addEventListener("abort", abort);
    try {
      for (; ; ) {
        const { done, value } = await reader.read();
        if (done) break;
        if (value.length > 0) silent = false;
        parser.push(decoder.decode(value, { stream: true }));
      }
    } catch {
    } finally {
      clearTimeout(buffering);
      controller.signal.removeEventListener("abort", abort);
    }
    if (controller.signal.aborted || expired) return "again";
    controller.abort();
    return "failed";
  }
  onEvent(frame) {
    const id = Number(frame.id);
    if (!Number.isSafeInteger(id) || id <= 0) return;
    const prev = this.cursor;
    if (prev !== null && id <= prev) return;
    let event;
    try {
      event = JSON.parse(frame.data);
    } catch {
      return;
    }
    this.cursor = id;
    this.sink.event(event, prev);
  }
};
function parseObject(text) {
  try {
    const value = JSON.parse(text);
    return typeof value === "object" && value !== null && !Array.isArray(value) ? value : { value };
  } catch {
    return { text };
  }
}
async function readDetail(response) {
  try {
    const text = (await response.text()).slice(0, DETAIL_BYTES);
    try {
      const body = JSON.parse(text);
      return body.detail ?? body;
    } catch {
      return text || response.statusText;
    }
  } catch {
    return response.statusText;
  }
}

// src/types.ts
var SsehubError = class extends Error {
  constructor(status, detail) {
    super(`ssehub answered ${status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    this.status = status;
    this.detail = detail;
    this.name = "SsehubError";
  }
  status;
  detail;
};

// src/client.ts
var SsehubClient = class {
  url;
  options;
  listeners = {
    event: /* @__PURE__ */ new Set(),
    notice: /* @__PURE__ */ new Set(),
    status: /* @__PURE__ */ new Set(),
    role: /* @__PURE__ */ new Set()
  };
  position;
  currentStatus = "connecting";
  currentRole = "alone";
  everLive = false;
  closed = false;
  shareKey = null;
  group = null;
  reader = null;
  lifecycle = [];
  /** Starts at once; listeners added in the same task miss nothing. */
  constructor(options = {}, environment = browserEnvironment()) {
    this.options = options;
    this.url = baseUrl(options.url);
    this.position = options.lastEventId ?? null;
    queueMicrotask(() => void this.start(environment));
  }
  /** The id of the last event delivered (or the position started from); null before any. */
  get lastEventId() {
    return this.position;
  }
  get status() {
    return this.currentStatus;
  }
  get role() {
    return this.currentRole;
  }
  /** Listen; returns a function that stops listening. */
  on(kind, listener) {
    this.listeners[kind].add(listener);
    return () => this.off(kind, listener);
  }
  off(kind, listener) {
    this.listeners[kind].delete(listener);
  }
  /** `PUT /me/subscriptions/{channel}`: true when new. Needs an access token (or the application's cookie). */
  async subscribe(channel) {
    const response = await this.call("PUT", channel);
    return response.status === 201;
  }
  /** `DELETE /me/subscriptions/{channel}`. */
  async unsubscribe(channel) {
    await this.call("DELETE", channel);
  }
  /** Stop for good: no more listeners called, no reconnects; another tab takes the stream over. */
  close() {
    if (this.closed) return;
    this.stopSharing();
    this.reader?.close();
    this.reader = null;
    for (const remove of this.lifecycle.splice(0)) remove();
    this.setRole("closed");
    this.setStatus("closed");
    this.closed = true;
  }
  async call(method, channel) {
    const token = await this.token();
    const headers = {};
    if (token !== null) headers["Authorization"] = `Bearer ${token}`;
    const response = await fetch(`${this.url}/me/subscriptions/${encodeURIComponent(channel)}`, {
      method,
      headers,
      credentials: token === null ? "include" : "same-origin"
    });
    if (!response.ok) throw new SsehubError(response.status, await readDetail(response));
    return response;
  }
  async token() {
    const source = this.options.token;
    if (source === void 0) return null;
    return typeof source === "string" ? source : await source();
  }
  async start(environment) {
    const share = this.options.share ?? true;
    let key = null;
    if (share !== false && environment) {
      try {
        const user = await identity(this.url, await this.token(), share);
        key = user === null ? null : `ssehub-client ${this.url} ${user}`;
      } catch {
        key = null;
      }
    }
    if (this.closed) return;
    this.watchLifecycle();
    this.run(key, environment);
  }
  /** Share under `key` (null: alone). */
  run(key, environment) {
    this.shareKey = key;
    if (key !== null && environment) {
      this.group = new ShareGroup(key, this.tabSide(), environment);
      return;
    }
    this.setRole("alone");
    this.reader = this.openStream(this.position, {
      event: (event, prev) => void this.receive(event, prev),
      notice: (notice, position) => {
        if (position !== void 0) this.adopt(position, true);
        this.emit("notice", notice);
      },
      position: (position) => {
        if (this.position === null) this.adopt(position, false);
      },
      status: (status) => this.setStatus(status)
    });
  }
  stopSharing() {
    this.group?.stop();
    this.group = null;
  }
  openStream(position, sink) {
    const backoff = this.options.backoff ?? {};
    return new StreamReader(
      {
        base: this.url,
        token: () => this.token(),
        from: position,
        initialBackoffMs: backoff.initialMs,
        maxBackoffMs: backoff.maxMs,
        bufferingTimeoutMs: this.options.bufferingTimeoutMs,
        accept: (token) => this.sameUser(token)
      },
      sink
    );
  }
  /**
   * A leader's token must still be its group's user: when the application's
   * `token` now answers for another user (a logout and login), this tab
   * leaves the group and joins that user's, so no tab gets another's events.
   */
  async sameUser(token) {
    if (this.shareKey === null || typeof this.options.share === "string") return true;
    const user = await identity(this.url, token, true);
    const key = user === null ? null : `ssehub-client ${this.url} ${user}`;
    if (key === this.shareKey || this.closed) return key === this.shareKey;
    const environment = browserEnvironment();
    this.stopSharing();
    this.run(key, environment);
    return false;
  }
  tabSide() {
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
      openStream: (position, sink) => this.openStream(position, sink)
    };
  }
  /** Deliver `event` unless it was delivered already or events before it may be missing. */
  receive(event, prev) {
    const at = this.position;
    if (at !== null && event.id <= at) return "duplicate";
    if (at !== null && (prev === null || prev > at)) return "gap";
    this.position = event.id;
    this.emit("event", event);
    return "delivered";
  }
  adopt(position, reset) {
    if (reset || this.position === null) this.position = position;
  }
  setStatus(status) {
    if (status === "live") this.everLive = true;
    if (status === "connecting" && this.everLive) status = "reconnecting";
    if (this.closed || status === this.currentStatus) return;
    this.currentStatus = status;
    this.emit("status", status);
  }
  setRole(role) {
    if (this.closed || role === this.currentRole) return;
    this.currentRole = role;
    this.emit("role", role);
  }
  emit(kind, value) {
    if (this.closed) return;
    for (const listener of [...this.listeners[kind]]) {
      try {
        listener(value);
      } catch (err) {
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
  watchLifecycle() {
    const doc = globalThis.document;
    const win = globalThis.window;
    if (!doc || !win) return;
    const pause = () => this.group?.pause();
    const resume = () => this.group?.resume();
    const hide = (e) => void (e.persisted && pause());
    const show = (e) => void (e.persisted && resume());
    doc.addEventListener("freeze", pause);
    doc.addEventListener("resume", resume);
    win.addEventListener("pagehide", hide);
    win.addEventListener("pageshow", show);
    this.lifecycle.push(
      () => doc.removeEventListener("freeze", pause),
      () => doc.removeEventListener("resume", resume),
      () => win.removeEventListener("pagehide", hide),
      () => win.removeEventListener("pageshow", show)
    );
  }
};
function baseUrl(url) {
  const origin = globalThis.location?.origin;
  const base = url ?? origin;
  if (!base) throw new TypeError("SsehubClient needs options.url outside a browser page");
  return new URL(base, origin).href.replace(/\/+$/, "");
}
export {
  SseParser,
  SsehubClient,
  SsehubError,
  backoffDelay
};
