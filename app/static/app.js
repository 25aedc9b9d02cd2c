// The ssehub page: log in, pick channels, watch the live stream, publish (admins).
// Everything the server sends is rendered with textContent, never innerHTML.
// The stream comes through the browser client (clients/js, served at
// /ssehub-client.js): one stream for all of a user's tabs of this page.
import { SsehubClient } from './ssehub-client.js';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'ssehub.access_token'; // sessionStorage: gone with the tab, never in a URL

const page = { token: sessionStorage.getItem(TOKEN_KEY), me: null, hub: null, subscribed: new Set() };

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === 'string' ? detail : JSON.stringify(detail));
    this.status = status;
  }
}

async function api(method, path, { json, form } = {}) {
  const headers = {};
  if (page.token) headers.Authorization = 'Bearer ' + page.token;
  let body;
  if (json !== undefined) { headers['Content-Type'] = 'application/json'; body = JSON.stringify(json); }
  if (form !== undefined) body = new URLSearchParams(form);
  const response = await fetch(path, { method, headers, body });
  const payload = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401 && page.me) logout('Your session expired; please log in again.');
    throw new ApiError(response.status, payload?.detail ?? response.statusText);
  }
  return payload;
}

function say(id, text, kind = '') {
  const el = $(id);
  el.textContent = text;
  el.className = 'message' + (kind ? ' ' + kind : '');
}

// --- log in, register, log out ---------------------------------------------

async function login(username, password) {
  const { access_token } = await api('POST', '/auth/token', { form: { username, password } });
  page.token = access_token;
  sessionStorage.setItem(TOKEN_KEY, access_token);
  await start();
}

$('login-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  say('login-message', '');
  try {
    await login($('login-username').value, $('login-password').value);
  } catch (err) {
    say('login-message', err.status === 401 ? 'Wrong username or password.' : err.message, 'error');
  }
});

$('register').addEventListener('click', async () => {
  const username = $('login-username').value;
  const password = $('login-password').value;
  try {
    await api('POST', '/auth/register', { json: { username, password } });
    await login(username, password);
  } catch (err) {
    const text = {
      403: 'Registration is closed on this server; ask an admin for an account.',
      409: 'That username is taken.',
      422: 'Username: 3–64 of A–Z a–z 0–9 _ . -; password: at least 8 characters.',
    }[err.status] ?? err.message;
    say('login-message', text, 'error');
  }
});

function logout(message = '') {
  page.hub?.close();
  page.hub = null;
  page.token = null;
  page.me = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $('app-panel').hidden = true;
  $('whoami').hidden = true;
  $('login-panel').hidden = false;
  $('event-log').replaceChildren();
  $('log-empty').hidden = false;
  say('login-message', message, message ? 'error' : '');
}
$('logout').addEventListener('click', () => logout());

// --- channels and subscriptions ----------------------------------------------

async function loadChannels() {
  const [channels, subscriptions] = await Promise.all([
    api('GET', '/channels?limit=1000'),
    api('GET', '/me/subscriptions'),
  ]);
  page.subscribed = new Set(subscriptions.map((s) => s.channel));
  const list = $('channel-list');
  list.replaceChildren(...channels.map(channelRow));
  $('channels-message').textContent = channels.length ? '' : 'No channels yet.';
  const select = $('publish-channel');
  const chosen = select.value;
  select.replaceChildren(...channels.map((c) => new Option(c.name, c.name)));
  if (chosen) select.value = chosen;
  await loadPresence(channels);
}

// --- presence: who is online --------------------------------------------------

// channel -> Set of usernames, for the subscribed channels that keep presence. Seeded
// from GET /channels/{name}/presence (a tab that follows another's stream has not
// seen the snapshot), then kept by the ssehub.presence, .join and .leave notices.
page.presence = new Map();

async function loadPresence(channels) {
  const watched = channels.filter((c) => c.presence && page.subscribed.has(c.name));
  const lists = await Promise.all(
    watched.map((c) => api('GET', `/channels/${encodeURIComponent(c.name)}/presence`).catch(() => null)),
  );
  page.presence = new Map(
    lists.filter(Boolean).map((list) => [list.channel, new Set(list.users.map((u) => u.username))]),
  );
  renderPresence();
}

function updatePresence(type, data) {
  if (type === 'ssehub.presence') {
    page.presence.set(data.channel, new Set(data.users.map((u) => u.username)));
  } else if (page.presence.has(data.channel)) {
    const users = page.presence.get(data.channel);
    if (type === 'ssehub.join') users.add(data.username); else users.delete(data.username);
  }
  renderPresence();
}

function renderPresence() {
  const rows = [];
  for (const [channel, users] of [...page.presence].sort(([a], [b]) => (a < b ? -1 : 1))) {
    const dt = document.createElement('dt');
    dt.textContent = channel;
    const dd = document.createElement('dd');
    dd.dataset.channel = channel;
    dd.textContent = [...users].sort().join(', ') || 'nobody';
    rows.push(dt, dd);
  }
  $('presence-list').replaceChildren(...rows);
  $('presence').hidden = rows.length === 0;
}

function channelRow(channel) {
  const li = document.createElement('li');
  const name = document.createElement('span');
  name.className = 'channel-name';
  name.textContent = channel.name;
  if (channel.private) {
    const badge = document.createElement('span');
    badge.className = 'private';
    badge.textContent = 'private';
    name.append(badge);
  }
  const desc = document.createElement('span');
  desc.className = 'channel-desc';
  desc.textContent = channel.description ?? '';
  name.append(desc);
  const button = document.createElement('button');
  button.type = 'button';
  button.dataset.channel = channel.name;
  const render = () => {
    const on = page.subscribed.has(channel.name);
    button.setAttribute('aria-pressed', String(on));
    button.textContent = on ? 'Subscribed' : 'Subscribe';
    button.setAttribute('aria-label', (on ? 'Unsubscribe from ' : 'Subscribe to ') + channel.name);
  };
  button.addEventListener('click', async () => {
    const on = page.subscribed.has(channel.name);
    try {
      if (on) await page.hub.unsubscribe(channel.name); else await page.hub.subscribe(channel.name);
      if (on) page.subscribed.delete(channel.name); else page.subscribed.add(channel.name);
      render();
      say('channels-message', '');
    } catch (err) {
      say('channels-message', err.message, 'error');
    }
  });
  render();
  li.append(name, button);
  return li;
}

$('channel-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const name = $('channel-name').value.trim();
  try {
    await api('POST', '/channels', {
      json: { name, description: $('channel-description').value, private: $('channel-private').checked,
        presence: $('channel-presence').checked },
    });
    say('channel-message', `Created ${name}.`, 'ok');
    e.target.reset();
    await loadChannels();
  } catch (err) {
    say('channel-message', err.status === 409 ? `A channel named ${name} exists.` : err.message, 'error');
  }
});

$('publish-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  let data;
  try {
    data = JSON.parse($('publish-data').value);
  } catch (err) {
    say('publish-message', 'Data is not valid JSON: ' + err.message, 'error');
    $('publish-data').focus();
    return;
  }
  const type = $('publish-type').value.trim();
  const channel = $('publish-channel').value;
  try {
    const event = await api('POST', `/channels/${encodeURIComponent(channel)}/events`, { json: { type, data } });
    say('publish-message', `Published event ${event.id} to ${channel}.`, 'ok');
  } catch (err) {
    say('publish-message', err.message, 'error');
  }
});

// --- the live log --------------------------------------------------------------

function logEntry(kind, title, details, body) {
  const li = document.createElement('li');
  li.className = kind;
  const meta = document.createElement('div');
  meta.className = 'meta';
  const strong = document.createElement('strong');
  strong.textContent = title;
  meta.append(strong);
  for (const text of details) {
    const span = document.createElement('span');
    span.textContent = text;
    meta.append(span);
  }
  const pre = document.createElement('pre');
  pre.textContent = body;
  li.append(meta, pre);
  $('event-log').append(li);
  $('log-empty').hidden = true;
  return li;
}

function showEvent(event) {
  const time = new Date(event.published_at).toLocaleTimeString();
  const li = logEntry('event', `#${event.id} ${event.channel}`, [event.type, time], JSON.stringify(event.data, null, 2));
  li.dataset.id = String(event.id);
}

const PRESENCE_NOTICES = new Set(['ssehub.presence', 'ssehub.join', 'ssehub.leave']);

function showNotice({ type, data }) {
  if (type === 'ssehub.live') return; // shown as the connection state instead
  if (PRESENCE_NOTICES.has(type)) return updatePresence(type, data);
  // The stream was refused for the token: the login expired.
  if (type === 'ssehub-client.error' && data.status === 401) return logout('Your session expired; please log in again.');
  const body = typeof data.message === 'string' ? data.message : JSON.stringify(data);
  const li = logEntry('notice', 'notice', [type], body);
  li.dataset.notice = type;
  // A removed channel (deleted, or access lost) should leave the list too.
  if (type === 'ssehub.channel_removed') loadChannels().catch(() => {});
}

const ROLES = {
  leader: 'This tab reads the stream for all your tabs of this page.',
  follower: 'Another tab of yours reads the stream and hands every event to this one.',
  alone: 'This tab reads a stream of its own.',
};

// The state pill says how the stream is; data-role and data-since (ms since the
// epoch of the last change) say which tab holds it and since when.
function showState() {
  const { hub } = page;
  if (!hub) return;
  const el = $('stream-state');
  if (el.dataset.state !== hub.status) {
    const resumed = el.dataset.state === 'reconnecting' && hub.status === 'live' && hub.lastEventId !== null;
    el.textContent = resumed ? `live · resumed from id ${hub.lastEventId}` : hub.status;
    el.dataset.state = hub.status;
  }
  el.dataset.role = hub.role;
  el.dataset.since = String(Date.now());
  $('stream-role').textContent = ROLES[hub.role] ?? '';
}

// --- start ----------------------------------------------------------------------

async function start() {
  page.me = await api('GET', '/users/me');
  $('username').textContent = page.me.username;
  $('admin-badge').hidden = !page.me.is_admin;
  $('admin-tools').hidden = !page.me.is_admin;
  $('login-panel').hidden = true;
  $('whoami').hidden = false;
  $('app-panel').hidden = false;
  page.hub?.close();
  // The access token goes in the stream's Authorization header: never in a URL.
  const hub = new SsehubClient({ token: () => page.token });
  page.hub = hub;
  hub.on('event', showEvent);
  hub.on('notice', showNotice);
  hub.on('status', showState);
  hub.on('role', showState);
  showState();
  await loadChannels();
}

if (page.token) start().catch(() => logout());
