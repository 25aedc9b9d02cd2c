// ssehub.js: a small EventSource client for ssehub. Copy it; it has no dependencies.
//
//   const stream = openStream({
//     // Sets the HttpOnly ssehub_stream cookie: no token in any URL.
//     renewCookie: () => fetch('/auth/stream-cookie', {
//       method: 'POST', credentials: 'include', headers: { Authorization: 'Bearer ' + accessToken } }),
//     onEvent: (event) => console.log(event.id, event.channel, event.data),
//   });
//   stream.close();
//
// Why a wrapper at all: EventSource reconnects by itself after a network error
// (sending Last-Event-ID and the cookie, so nothing is lost), but it gives up
// for good on any non-200 answer, and the stream cookie expires. This file
// renews the cookie and reopens from the last id in those cases, so the caller
// sees one ordered stream with no gap and no duplicate.
//
// A page on another origin of the same site (app.example.com and
// sse.example.com) works the same, with `path` a full URL and ssehub's
// SSEHUB_CORS_ORIGINS listing the page's origin. A page on another site never
// gets the cookie sent (SameSite=Lax, third-party cookie blocking): give it
// `getStreamToken` instead, which puts a stream token in the URL.

const NOTICES = [
  'ssehub.live', 'ssehub.truncated', 'ssehub.expired', 'ssehub.channel_removed', 'ssehub.reset',
];
const BACKOFF_MS = [250, 1000, 2000, 5000]; // a dead server is not hammered, a blip heals fast

/**
 * Open `path` (default '/stream'; a full URL for another origin) and keep it
 * open until close().
 * options: renewCookie (async () => any: sets the stream cookie, e.g. a fetch()
 * of POST /auth/stream-cookie; it fails by throwing or by returning a Response
 * that is not ok; called before every open this wrapper makes, so also after
 * ssehub.expired and after a refused reconnect), or instead
 * getStreamToken (async () => string: a stream token for the URL, for pages on
 * another site), path, lastEventId (a starting position: only events after it
 * are delivered), types (event types to listen for; EventSource has no
 * wildcard), onEvent(event), onNotice(type, data), onState(state, detail) with
 * state 'connecting' | 'live' | 'reconnecting' | 'closed'.
 */
export function openStream(options) {
  const { renewCookie, getStreamToken, path = '/stream' } = options;
  if (!renewCookie === !getStreamToken) throw new TypeError('openStream needs renewCookie or getStreamToken');
  const onEvent = options.onEvent ?? (() => {});
  const onNotice = options.onNotice ?? (() => {});
  const onState = options.onState ?? (() => {});
  const types = new Set(options.types ?? ['message']);
  let lastEventId = options.lastEventId ?? null;
  let source = null;
  let closed = false;
  let failures = 0;
  let timer = null;
  let wasLive = false; // 'connecting' the first time, 'reconnecting' after

  function deliver(message) {
    // Ids only grow, so anything at or below the last one is a replayed duplicate.
    const id = Number(message.lastEventId);
    if (!Number.isSafeInteger(id) || id <= 0) return;
    if (lastEventId !== null && id <= lastEventId) return;
    lastEventId = id;
    failures = 0;
    onEvent(JSON.parse(message.data));
  }

  function listen(es, type) {
    es.addEventListener(type, deliver);
  }

  async function connect() {
    timer = null;
    if (closed) return;
    onState(wasLive ? 'reconnecting' : 'connecting', { lastEventId });
    const query = [];
    try {
      if (renewCookie) {
        const answer = await renewCookie();
        // A fetch() Response that is not 2xx (e.g. 401: the login expired) did not renew.
        if (answer?.ok === false) throw new Error('stream cookie: ' + answer.status);
      }
      // EventSource cannot send headers: without the cookie the token goes in the
      // URL, a stream token, which only opens streams and expires.
      else query.push('access_token=' + encodeURIComponent(await getStreamToken()));
    } catch {
      // The API itself is unreachable (or the login expired): try again later.
      return retry();
    }
    if (closed) return;
    // The first position; the browser's own reconnects send Last-Event-ID, which wins.
    if (lastEventId !== null) query.push('last_event_id=' + lastEventId);
    const url = query.length ? path + (path.includes('?') ? '&' : '?') + query.join('&') : path;
    // withCredentials sends the cookie to another origin too (same origin always does).
    const es = new EventSource(url, { withCredentials: Boolean(renewCookie) });
    source = es;
    let resumedFrom = lastEventId;
    // onopen fires on every (re)connection, the browser's own ones included.
    es.onopen = () => { resumedFrom = lastEventId; };
    for (const type of types) listen(es, type);
    for (const type of NOTICES) {
      es.addEventListener(type, (message) => {
        let data = {};
        try { data = JSON.parse(message.data); } catch { /* keep {} */ }
        onNotice(type, data);
        if (type === 'ssehub.live') {
          failures = 0;
          wasLive = true;
          onState('live', { resumedFrom, replayed: data.replayed ?? 0 });
        } else if (type === 'ssehub.reset' && Number.isSafeInteger(data.last_event_id)) {
          // The position was above every id the server has issued (a restore): the
          // stream goes on from its head, below our last id. Without this every
          // later event would be dropped as an already-seen duplicate.
          lastEventId = data.last_event_id;
        } else if (type === 'ssehub.expired') {
          // The server ends the stream now; EventSource would retry with the dead cookie.
          reopen();
        }
      });
    }
    es.onerror = () => {
      if (source !== es || closed) return;
      if (es.readyState === EventSource.CONNECTING) {
        // A network error: the browser reconnects on its own with Last-Event-ID.
        onState('reconnecting', { lastEventId });
      } else {
        // CLOSED: a non-200 answer (401 expired cookie, 429, 5xx). Renew and reopen.
        reopen();
      }
    };
  }

  function reopen() {
    if (source) source.close();
    source = null;
    retry();
  }

  function retry() {
    if (closed || timer !== null) return;
    const delay = BACKOFF_MS[Math.min(failures, BACKOFF_MS.length - 1)];
    failures += 1;
    onState(wasLive ? 'reconnecting' : 'connecting', { lastEventId });
    timer = setTimeout(connect, delay);
  }

  connect();

  return {
    /** The id of the last event delivered, or null. */
    get lastEventId() { return lastEventId; },
    /** Also deliver events of `type` from now on. */
    listen(type) {
      if (types.has(type)) return;
      types.add(type);
      if (source) listen(source, type);
    },
    /** Stop for good: no more callbacks, no reconnects. */
    close() {
      closed = true;
      if (timer !== null) clearTimeout(timer);
      if (source) source.close();
      source = null;
      onState('closed', { lastEventId });
    },
  };
}
