/**
 * One stream per browser: the tabs of one origin and one user elect a leader
 * with the Web Locks API and hand events on over a BroadcastChannel.
 *
 * Why Web Locks and BroadcastChannel, not a SharedWorker: a lock is released
 * by the browser itself the moment its tab closes or its renderer crashes, so
 * the next tab in line gets it at once, with no timeout to wait out; both are
 * in every current browser (SharedWorker is missing from Chrome on Android),
 * need no second script file served beside the page, and keep the code that
 * reads the stream the same in every tab. A frozen or hung leader keeps its
 * lock: the followers notice its silence (a beat every BEAT_MS, a ping
 * answered at once) and steal the lock; stealing makes the browser release
 * it from the old holder, whose `request()` then fails.
 *
 * The guarantees, and where they are kept:
 * - Every tab delivers each event once and in id order: `TabSide.receive`
 *   drops ids at or below the tab's position, and refuses an event whose
 *   `prev` (the leader's position before it) is above the tab's position,
 *   since events between may be missing: the tab then asks (`need`), and the
 *   leader sends them from its log or resumes its stream from that tab's
 *   position (the server replays; the other tabs drop what they have).
 * - A leader that lost its lock and does not know it yet (frozen, then
 *   thawed) cannot mix its stale stream in: every leadership has a term,
 *   above every term its tab has seen, and tabs ignore messages of a lower
 *   term than the highest they know.
 * - A new leader resumes from its own position: it received every relay the
 *   others did (they all come in order from one sender), so that is the
 *   highest position any tab has seen; a tab behind it asks as above.
 */

import type { StreamReader, StreamSink } from "./stream.js";
import type { SsehubEvent, SsehubNotice, SsehubRole, SsehubStatus } from "./types.js";

/** How often a leader says it is alive. */
const BEAT_MS = 400;
/** A follower that heard nothing from the leader this long pings it... */
const SILENCE_MS = 600;
/** ...and takes over when the ping is not answered within this long. */
const PING_WAIT_MS = 600;
const WATCH_MS = 200;
/** The leader's memory of what it relayed, to catch up a tab that fell behind. */
const LOG_SIZE = 1000;
/** A tab asks again for what it misses no more often than this. */
const NEED_EVERY_MS = 1000;

export type Receipt = "delivered" | "duplicate" | "gap";

/** What the group needs from the tab it runs in. */
export interface TabSide {
  readonly position: number | null;
  receive(event: SsehubEvent, prev: number | null): Receipt;
  /** The position became `position` without events: known at last (`reset` false) or a reset. */
  adopt(position: number, reset: boolean): void;
  notice(notice: SsehubNotice): void;
  status(status: SsehubStatus): void;
  role(role: SsehubRole): void;
  /** This tab's own stream, from `position`. */
  openStream(position: number | null, sink: StreamSink): StreamReader;
}

/** The two browser APIs it needs (tests may pass their own). */
export interface ShareEnvironment {
  locks: LockManager;
  channel: (name: string) => BroadcastChannel;
}

/** The browser's Web Locks and BroadcastChannel, or null where either is missing. */
export function browserEnvironment(): ShareEnvironment | null {
  const locks = (globalThis.navigator as Navigator | undefined)?.locks;
  if (!locks || typeof globalThis.BroadcastChannel !== "function") return null;
  return { locks, channel: (name) => new BroadcastChannel(name) };
}

type Status = Exclude<SsehubStatus, "closed">;
interface Relayed {
  prev: number | null;
  event: SsehubEvent;
}
type Message =
  | { t: "hello"; from: string; pos: number | null }
  | { t: "need"; from: string; pos: number }
  | { t: "ping"; from: string }
  | { t: "beat"; term: number; from: string; pos: number | null; status: Status }
  | { t: "event"; term: number; prev: number | null; event: SsehubEvent }
  | { t: "notice"; term: number; notice: SsehubNotice; pos?: number }
  | { t: "catchup"; term: number; to: string; events: Relayed[] };

export class ShareGroup {
  private readonly me = Math.random().toString(36).slice(2) + Date.now().toString(36);
  private readonly channel: BroadcastChannel;
  private term = 0;
  private heardAt = Date.now();
  private pingAt: number | null = null;
  private neededAt = 0;
  private generation = 0;
  private waiting: AbortController | null = null;
  private stopped = false;
  private paused = false;
  private readonly watchdog: ReturnType<typeof setInterval>;
  // while leading:
  private reader: StreamReader | null = null;
  private release: (() => void) | null = null;
  private beat: ReturnType<typeof setInterval> | undefined;
  private status: Status = "connecting";
  private log: Relayed[] = [];

  constructor(
    private readonly key: string,
    private readonly tab: TabSide,
    private readonly env: ShareEnvironment,
  ) {
    this.channel = env.channel(key);
    this.channel.onmessage = (e: MessageEvent) => this.onMessage(e.data as Message);
    this.watchdog = setInterval(() => this.watch(), WATCH_MS);
    this.join();
  }

  get leading(): boolean {
    return this.reader !== null;
  }

  /** Leave for good: the next tab in line takes the lock at once. */
  stop(): void {
    this.stopped = true;
    this.leave();
    clearInterval(this.watchdog);
    this.channel.close();
  }

  /** The page is frozen or put in the back-forward cache: let another tab lead meanwhile. */
  pause(): void {
    if (this.stopped || this.paused) return;
    this.paused = true;
    this.leave();
  }

  resume(): void {
    if (this.stopped || !this.paused) return;
    this.paused = false;
    this.join();
  }

  private join(): void {
    this.heardAt = Date.now();
    this.pingAt = null;
    this.tab.role("follower");
    this.post({ t: "hello", from: this.me, pos: this.tab.position });
    this.candidate(false);
  }

  private leave(): void {
    this.generation++;
    this.waiting?.abort();
    this.waiting = null;
    if (this.leading) this.stepDown();
  }

  private post(message: Message): void {
    if (!this.stopped) this.channel.postMessage(message);
  }

  /** Wait in line for the lock, or (`steal`) take it from a leader that stopped answering. */
  private candidate(steal: boolean): void {
    const generation = ++this.generation;
    this.waiting?.abort();
    const waiting = steal ? null : new AbortController();
    this.waiting = waiting;
    const options: LockOptions = waiting ? { signal: waiting.signal } : { steal: true };
    this.env.locks
      .request(this.key, options, () => (generation === this.generation ? this.lead() : undefined))
      .catch(() => undefined) // aborted while waiting, or stolen while held
      .finally(() => {
        if (generation !== this.generation) return; // superseded by a steal, pause or stop
        if (this.leading) this.stepDown();
        if (!this.stopped && !this.paused) this.candidate(false); // back in line
      });
  }

  /** Holds the lock until the returned promise settles. */
  private lead(): Promise<void> {
    this.term = Math.max(this.term + 1, Date.now() * 1000 + Math.floor(Math.random() * 1000));
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

  private stepDown(): void {
    this.reader?.close();
    this.reader = null;
    clearInterval(this.beat);
    this.release?.();
    this.release = null;
    this.heardAt = Date.now();
    this.pingAt = null;
    this.tab.role(this.stopped ? "closed" : "follower");
  }

  private sendBeat(): void {
    const pos = this.reader?.position ?? null;
    this.post({ t: "beat", term: this.term, from: this.me, pos, status: this.status });
  }

  /** The leader's stream: relayed to every tab, and delivered here. */
  private sink(): StreamSink {
    const current = (): boolean => this.leading && !this.stopped;
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
        if (pos !== undefined) {
          this.log = []; // a reset: what came before is another history
          this.tab.adopt(pos, true);
        }
        this.post(pos === undefined ? { t: "notice", term: this.term, notice } : { t: "notice", term: this.term, notice, pos });
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
      },
    };
  }

  /** Resume the stream from `pos`: the server replays, the tabs drop what they have. */
  private restart(pos: number | null): void {
    if (pos === null || !this.reader) return;
    this.log = [];
    this.reader.restartFrom(pos);
  }

  private onMessage(m: Message): void {
    if (this.stopped || this.paused || typeof m !== "object" || m === null) return;
    if ("term" in m) {
      if (m.term < this.term) return; // a leader that lost its lock: stale
      if (m.term > this.term) {
        this.term = m.term;
        if (this.leading) this.stepDown(); // it took the lock from us
      }
      if (this.leading) return; // our own term: only we send it
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
        else this.pingAt ??= Date.now(); // another follower asked: its answer counts for us
        break;
      case "beat":
        this.tab.status(m.status);
        if (m.pos === null) break;
        if (this.tab.position === null) this.tab.adopt(m.pos, false);
        else if (m.pos > this.tab.position) this.ask(); // it relayed what we did not get
        break;
      case "event":
        if (this.tab.receive(m.event, m.prev) === "gap") this.ask();
        break;
      case "notice":
        if (m.pos !== undefined) this.tab.adopt(m.pos, true);
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
  private ask(): void {
    const pos = this.tab.position;
    const now = Date.now();
    if (pos === null || now - this.neededAt < NEED_EVERY_MS) return;
    this.neededAt = now;
    this.post({ t: "need", from: this.me, pos });
  }

  /** Leader: bring tab `to`, at `pos`, up to date, from the log if it reaches back that far. */
  private serve(to: string, pos: number): void {
    const head = this.reader?.position ?? null;
    if (head !== null && pos >= head) return; // it has all we relayed
    const first = this.log[0];
    if (head !== null && first && first.prev !== null && first.prev <= pos) {
      const events = this.log.filter((r) => r.event.id > pos);
      this.post({ t: "catchup", term: this.term, to, events });
    } else {
      this.restart(pos);
    }
  }

  /** Follower: a leader that stops answering is frozen or hung: take its place. */
  private watch(): void {
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
}
