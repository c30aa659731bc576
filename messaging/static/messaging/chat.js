// The chat page: rooms and direct messages, history over HTTP, live messages over RelayClient,
// pending/sent marks, connection state, presence and typing. Text is only ever rendered with
// textContent.

import { HttpError, RelayClient } from "./relay.js";

const me = JSON.parse(document.getElementById("chat-user").textContent);
const $ = (id) => document.getElementById(id);

const STATE_LABELS = {
  connecting: "Connecting…",
  online: "Online",
  reconnecting: "Reconnecting…",
  offline: "Offline",
  evicted: "Paused",
};
const TYPING_SHOWN_MS = 4000;
const TYPING_SEND_EVERY_MS = 2500;
const GROUP_WITHIN_MS = 5 * 60 * 1000;
const CACHE_KEY = "chat:cache"; // sessionStorage: what an offline reload draws at once
const CACHED_MESSAGES = 50;

const relay = new RelayClient();
// Conversations: a room under its name, the direct messages with a user under "@" + the user's
// name (room names cannot start with "@"), and the server's messages to this user under NOTICES.
// Each is {name: key, kind: "room" | "user" | "server", peer, members, messages: Map(id ->
// message), loaded, unread, cached}.
const rooms = new Map();
const pending = new Map(); // client_msg_id -> outbox entry (with .failed when refused)
const online = new Set(); // other users online (presence frames)
const typers = new Map(); // room -> Map(user -> shown until)
let current = null;
let lastTypingSent = 0;

// For tests and curious developers: the library and what this page received, in order.
window.relay = relay;
window.chat = { received: [], rooms, pending, online };

// -- the store ------------------------------------------------------------------------------------

// The server's direct messages (docs/publish.md): a conversation of their own, read-only, never
// a room name (room names cannot start with "!").
const NOTICES = "!notices";

function directKey(user) {
  return `@${user}`;
}

/** A message from the server (`from` is {"user": null, "client_id": null, "server": label}). */
function isServer(message) {
  return typeof message.from?.server === "string";
}

/** Who a message is shown as from: its user, or the server's label. */
function authorOf(message) {
  return isServer(message) ? message.from.server : message.from.user;
}

/** The conversation of a message to `to` from `from` (a user name). */
function keyOf(to, from) {
  if (to.room !== undefined) return to.room;
  return directKey(from && from !== me ? from : to.user);
}

/** The conversation of a received message. */
function keyOfMessage(message) {
  if (isServer(message) && message.to.room === undefined) return NOTICES;
  return keyOf(message.to, message.from?.user);
}

function room(key) {
  if (!rooms.has(key)) {
    const peer = key.startsWith("@") ? key.slice(1) : null;
    const kind = key === NOTICES ? "server" : peer === null ? "room" : "user";
    rooms.set(key, {
      name: key,
      kind,
      peer,
      members: peer === null ? [] : [...new Set([me, peer])],
      messages: new Map(),
      loaded: false,
      unread: 0,
      cached: false,
    });
  }
  return rooms.get(key);
}

/** The `to` of a message sent to conversation `key`. */
function targetOf(key) {
  const conversation = room(key);
  return conversation.kind === "room" ? { room: conversation.name } : { user: conversation.peer };
}

function titleOf(key) {
  const conversation = room(key);
  if (conversation.kind === "server") return "⚑ Notices";
  return conversation.kind === "room" ? `# ${conversation.name}` : `@ ${conversation.peer}`;
}

function upsert(message) {
  if (!message.to) return false;
  const target = room(keyOfMessage(message));
  const known = target.messages.has(message.id);
  target.messages.set(message.id, message);
  return !known;
}

function newestId(conversation) {
  let newest = 0;
  for (const id of conversation.messages.keys()) newest = Math.max(newest, id);
  return newest;
}

function textOf(body) {
  if (body && typeof body === "object" && typeof body.text === "string") return body.text;
  return JSON.stringify(body);
}

// -- rendering ------------------------------------------------------------------------------------

function initials(name) {
  return (name || "?").slice(0, 1).toUpperCase();
}

function hue(name) {
  let h = 0;
  for (const ch of name || "") h = (h * 31 + ch.charCodeAt(0)) % 360;
  return h;
}

function avatar(name, extraClass = "") {
  const el = document.createElement("span");
  el.className = `avatar ${extraClass}`.trim();
  el.textContent = initials(name);
  el.style.setProperty("--hue", hue(name));
  el.setAttribute("aria-hidden", "true");
  return el;
}

function timeOf(iso) {
  const date = iso ? new Date(iso) : new Date();
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function renderMessages() {
  const list = $("messages");
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  list.replaceChildren();
  if (!current) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = "Join or create a room to start talking.";
    list.append(empty);
    return;
  }
  const target = room(current);
  const items = [...target.messages.values()].sort((a, b) => a.id - b.id).map((m) => ({
    id: m.id,
    user: authorOf(m),
    server: isServer(m),
    body: m.body,
    created: m.created,
    mark: !isServer(m) && m.from.user === me ? "sent" : null,
  }));
  for (const entry of pending.values()) {
    if (keyOf(entry.to, me) !== current) continue;
    items.push({
      cmid: entry.client_msg_id,
      user: me,
      body: entry.body,
      created: entry.created,
      mark: entry.failed ? "failed" : "pending",
    });
  }
  if (items.length === 0) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = `No messages in ${titleOf(current)} yet. Say hello!`;
    list.append(empty);
  }
  let previous = null;
  for (const item of items) {
    const row = document.createElement("div");
    row.className = "msg";
    if (item.server) row.classList.add("server");
    else if (item.user === me) row.classList.add("own");
    if (item.mark) row.classList.add(item.mark);
    if (item.id !== undefined) row.dataset.id = item.id;
    if (item.cmid) row.dataset.cmid = item.cmid;
    const grouped =
      previous &&
      previous.user === item.user &&
      Boolean(previous.server) === Boolean(item.server) &&
      Math.abs(new Date(item.created) - new Date(previous.created)) < GROUP_WITHIN_MS;
    if (grouped) {
      row.classList.add("cont");
      const gutter = document.createElement("span");
      gutter.className = "gutter";
      row.append(gutter);
    } else {
      row.append(item.server ? avatar("⚑", "server") : avatar(item.user));
    }
    const content = document.createElement("div");
    content.className = "content";
    if (!grouped) {
      const meta = document.createElement("div");
      meta.className = "meta";
      const author = document.createElement("span");
      author.className = "author";
      author.textContent = item.user;
      if (item.server) {
        author.title = "A message from the server";
        const tag = document.createElement("span");
        tag.className = "server-tag";
        tag.textContent = "server";
        author.append(" ", tag);
      }
      const time = document.createElement("time");
      time.textContent = timeOf(item.created);
      if (item.created) time.dateTime = item.created;
      meta.append(author, time);
      content.append(meta);
    }
    const line = document.createElement("div");
    line.className = "line";
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = textOf(item.body);
    line.append(text);
    if (item.mark) {
      const mark = document.createElement("span");
      mark.className = "mark";
      mark.textContent = { sent: "✓ Sent", pending: "◷ Sending", failed: "⚠ Not sent" }[item.mark];
      mark.title = {
        sent: "Stored by the server",
        pending: "Kept in this tab until the server confirms it",
        failed: "The server refused this message",
      }[item.mark];
      line.append(mark);
    }
    content.append(line);
    row.append(content);
    list.append(row);
    previous = item;
  }
  if (nearBottom) list.scrollTop = list.scrollHeight;
}

function renderRooms() {
  for (const [listId, kind] of [
    ["rooms", "room"],
    ["directs", "user"],
  ]) {
    const list = $(listId);
    list.replaceChildren();
    // The server's notices are listed with the direct messages.
    const shown = [...rooms.values()].filter(
      (r) => r.kind === kind || (kind === "user" && r.kind === "server"),
    );
    for (const r of shown.sort((a, b) => a.name.localeCompare(b.name))) {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = `#${encodeURIComponent(r.name)}`;
      link.className = "room-link";
      link.dataset.key = r.name;
      if (r.name === current) link.classList.add("active");
      const label = document.createElement("span");
      label.textContent = titleOf(r.name);
      link.append(label);
      if (r.unread && r.name !== current) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = String(r.unread);
        link.append(badge);
      }
      item.append(link);
      list.append(item);
    }
  }
}

function renderPeople() {
  const list = $("people");
  list.replaceChildren();
  const members = current ? room(current).members : [];
  const sorted = [...members].sort((a, b) => {
    const rank = (n) => (n === me ? 0 : online.has(n) ? 1 : 2);
    return rank(a) - rank(b) || a.localeCompare(b);
  });
  for (const name of sorted) {
    const isOnline = name === me ? relay.state === "online" : online.has(name);
    const item = document.createElement("li");
    item.className = isOnline ? "person online" : "person";
    item.dataset.user = name;
    item.append(avatar(name, "small"));
    const label = document.createElement("span");
    label.className = "person-name";
    label.textContent = name === me ? `${name} (you)` : name;
    const dot = document.createElement("span");
    dot.className = "presence-dot";
    dot.title = isOnline ? "online" : "offline";
    item.append(label, dot);
    list.append(item);
  }
}

function renderHeader() {
  $("room-title").textContent = current ? titleOf(current) : "No room yet";
  const members = current ? room(current).members.length : 0;
  let sub = "";
  const readOnly = current && room(current).kind === "server";
  if (readOnly) sub = "Messages from the server";
  else if (current && room(current).kind === "user") sub = "Direct messages";
  else if (current) sub = `${members} member${members === 1 ? "" : "s"}`;
  $("room-sub").textContent = sub;
  const input = $("composer-input");
  input.disabled = !current || readOnly;
  $("composer-send").disabled = !current || readOnly;
  input.placeholder = readOnly
    ? "The server's notices cannot be answered"
    : current
      ? `Message ${titleOf(current)}`
      : "Pick a room first";
  const count = relay.pending().length;
  const badge = $("outbox-count");
  badge.hidden = count === 0;
  badge.textContent = `${count} waiting to send`;
}

function renderTyping() {
  const now = Date.now();
  const names = [...(typers.get(current) ?? new Map()).entries()]
    .filter(([, until]) => until > now)
    .map(([name]) => name);
  const el = $("typing");
  el.replaceChildren();
  if (names.length === 0) return;
  const dots = document.createElement("span");
  dots.className = "typing-dots";
  dots.append(document.createElement("i"), document.createElement("i"), document.createElement("i"));
  const text = document.createElement("span");
  text.textContent =
    names.length === 1 ? `${names[0]} is typing…` : `${names.join(", ")} are typing…`;
  el.append(dots, text);
}

function renderState() {
  const el = $("conn-state");
  el.dataset.state = relay.state;
  el.querySelector(".conn-label").textContent = STATE_LABELS[relay.state] ?? relay.state;
  renderPeople();
}

function render() {
  renderRooms();
  renderHeader();
  renderMessages();
  renderPeople();
  renderTyping();
}

function showBanner(text) {
  const banner = $("banner");
  banner.hidden = !text;
  banner.textContent = text ?? "";
}

// -- loading --------------------------------------------------------------------------------------

async function withRetry(task) {
  for (let delay = 500; ; delay = Math.min(delay * 2, 8000)) {
    try {
      return await task();
    } catch (error) {
      if (error instanceof HttpError && error.status < 500 && error.status !== 429) throw error;
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
}

async function loadRooms() {
  const answer = await withRetry(() => relay.request("GET", "/api/rooms/"));
  const names = new Set(answer.rooms.map((r) => r.name));
  for (const [key, r] of rooms) {
    // A cached room this user is no longer in (left from another tab).
    if (r.kind === "room" && r.cached && !names.has(key)) rooms.delete(key);
  }
  for (const r of answer.rooms) {
    room(r.name).members = r.members;
    room(r.name).cached = false;
  }
}

/** Load the list of direct conversations; returns those with messages this page lacks. */
async function loadDirects() {
  const listed = await withRetry(() => relay.conversations());
  const behind = [];
  for (const { user, last_id: lastId } of listed) {
    const conversation = room(directKey(user));
    conversation.cached = false;
    if (lastId > newestId(conversation)) behind.push(conversation);
  }
  return behind;
}

const historyLoads = new Map(); // conversation -> in-flight load, so two callers share one request

function loadHistory(key, options = {}) {
  if (!historyLoads.has(key)) {
    historyLoads.set(
      key,
      fetchHistory(key, options).finally(() => historyLoads.delete(key)),
    );
  }
  return historyLoads.get(key);
}

async function fetchHistory(key, { unread = false } = {}) {
  // `unread`: a reload after a resync, whose new messages from others the page has not shown.
  const messages = await withRetry(() =>
    key === NOTICES ? relay.notices({ limit: 100 }) : relay.history(targetOf(key), { limit: 100 }),
  );
  // No Notices conversation until the server has sent this user something.
  if (key === NOTICES && messages.length === 0 && !rooms.has(NOTICES)) return;
  const target = room(key);
  let fresh = 0;
  for (const message of messages) {
    if (upsert(message) && (isServer(message) || message.from.user !== me)) fresh += 1;
  }
  target.loaded = true;
  if (key === current) {
    renderMessages();
  } else if (unread && fresh) {
    target.unread += fresh;
    renderRooms();
  }
}

async function select(key) {
  if (!key || !rooms.has(key)) return;
  current = key;
  room(key).unread = 0;
  render();
  saveCache();
  if (!room(key).loaded) await loadHistory(key);
}

async function openDirect(user) {
  // The history answers 404 unknown_user for a user who does not exist.
  const key = directKey(user);
  const known = rooms.has(key);
  try {
    await loadHistory(key);
  } catch (error) {
    if (!known) rooms.delete(key);
    throw error;
  }
  window.location.hash = encodeURIComponent(key); // hashchange selects it
}

// -- the offline cache ----------------------------------------------------------------------------

function saveCache() {
  // The conversations and the newest messages of the current one, so that a reload without
  // the server (offline) draws them, and the outbox, at once.
  const shown = current
    ? [...room(current).messages.values()].sort((a, b) => a.id - b.id).slice(-CACHED_MESSAGES)
    : [];
  const cache = {
    me,
    current,
    conversations: [...rooms.values()].map((r) => ({ key: r.name, members: r.members })),
    messages: shown,
  };
  try {
    sessionStorage.setItem(CACHE_KEY, JSON.stringify(cache));
  } catch {
    // storage full or disabled: a reload just waits for the server
  }
}

function restoreCache() {
  let cache = null;
  try {
    cache = JSON.parse(sessionStorage.getItem(CACHE_KEY) ?? "null");
  } catch {
    cache = null;
  }
  if (!cache || cache.me !== me) return null;
  for (const { key, members } of cache.conversations ?? []) {
    const conversation = room(key);
    conversation.members = members;
    conversation.cached = true;
  }
  for (const message of cache.messages ?? []) upsert(message);
  return cache.current;
}

async function joinOrCreate(name) {
  if (name.startsWith("@")) {
    await openDirect(name.slice(1));
    return;
  }
  const path = `/api/rooms/${encodeURIComponent(name)}/join`;
  let answer;
  try {
    answer = await relay.request("POST", path);
  } catch (error) {
    if (!(error instanceof HttpError) || error.status !== 404) throw error;
    answer = await relay.request("POST", "/api/rooms/", { name });
  }
  room(answer.name).members = answer.members;
  if (window.location.hash.slice(1) !== encodeURIComponent(answer.name)) {
    window.location.hash = encodeURIComponent(answer.name); // hashchange selects it
  } else {
    await select(answer.name);
  }
}

// -- relay events ---------------------------------------------------------------------------------

relay.on("state", ({ state, previous }) => {
  // Presence is unknown without a socket; the server sends it again at every connect.
  if (previous === "online") online.clear();
  renderState();
  if (state === "online") showBanner(null);
  if (state === "evicted") {
    showBanner("Paused: you have more tabs open than the server keeps. Send a message to use this tab again.");
  }
});

relay.on("message", (message) => {
  window.chat.received.push(message.id);
  if (!message.to) return;
  const name = keyOfMessage(message);
  const isNew = upsert(message);
  const target = room(name);
  if (isNew && name !== current && (isServer(message) || message.from.user !== me)) {
    target.unread += 1;
  }
  if (target.kind === "room" && !isServer(message) && !target.members.includes(message.from.user)) {
    target.members.push(message.from.user);
  }
  if (name === current) {
    // Someone who sent a message has stopped typing.
    typers.get(name)?.delete(message.from.user);
    renderMessages();
    renderTyping();
  } else {
    renderRooms();
  }
});

relay.on("pending", (entry) => {
  pending.set(entry.client_msg_id, entry);
  renderMessages();
  renderHeader();
});

relay.on("sent", (entry) => {
  pending.delete(entry.client_msg_id);
  // The delivery of this message to this tab may come before or after this answer; by id
  // they are one message.
  if (!room(keyOf(entry.to, me)).messages.has(entry.id)) {
    upsert({
      id: entry.id,
      from: { user: me, client_id: entry.client_id },
      to: entry.to,
      body: entry.body,
      created: entry.created,
    });
  }
  renderMessages();
  renderHeader();
});

relay.on("failed", (entry) => {
  pending.set(entry.client_msg_id, { ...entry, failed: true });
  renderMessages();
  renderHeader();
});

relay.on("presence", ({ user, online: isOnline }) => {
  if (isOnline) online.add(user);
  else online.delete(user);
  renderPeople();
});

relay.on("typing", ({ room: name, user }) => {
  if (!typers.has(name)) typers.set(name, new Map());
  typers.get(name).set(user, Date.now() + TYPING_SHOWN_MS);
  if (name === current) renderTyping();
});

relay.on("resync", async () => {
  // This tab's queue may not hold everything (a new client, a queue limit): reload the history
  // of every conversation shown so far, and of every direct conversation with newer messages
  // (a direct message sent while the queue was full is only in the history).
  const reload = (key) =>
    loadHistory(key, { unread: true }).catch((error) => {
      console.warn(`chat: could not reload the history of ${key}`, error);
    });
  for (const r of rooms.values()) if (r.loaded) reload(r.name);
  // Notices that a live message opened (not loaded yet) are reloaded too: some may be only in
  // their history now.
  if (!rooms.has(NOTICES) || !rooms.get(NOTICES).loaded) reload(NOTICES);
  try {
    for (const r of await loadDirects()) reload(r.name);
  } catch (error) {
    console.warn("chat: could not reload the direct conversations", error);
  }
  renderRooms();
});

relay.on("client", ({ reason }) => {
  if (reason === "duplicated") {
    showBanner("This tab was duplicated, so it now has a client of its own.");
  }
});

relay.on("loggedout", () => {
  showBanner("You have been logged out. Reload the page to log in again.");
  $("composer-input").disabled = true;
  $("composer-send").disabled = true;
});

// -- the page's own events ------------------------------------------------------------------------

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("composer-input");
  const text = input.value.trim();
  if (!text || !current || room(current).kind === "server") return;
  relay.send(targetOf(current), { text });
  input.value = "";
  lastTypingSent = 0;
  input.focus();
});

$("composer-input").addEventListener("input", () => {
  const now = Date.now();
  if (current && room(current).kind === "room" && now - lastTypingSent > TYPING_SEND_EVERY_MS) {
    lastTypingSent = now;
    relay.typing(current);
  }
});

$("join-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("join-name");
  const name = input.value.trim();
  $("join-error").textContent = "";
  if (!name) return;
  try {
    await joinOrCreate(name);
    input.value = "";
  } catch (error) {
    $("join-error").textContent =
      error instanceof HttpError ? `Could not join: ${error.code}` : "Could not reach the server";
  }
});

window.addEventListener("hashchange", () => {
  select(decodeURIComponent(window.location.hash.slice(1)));
});

window.addEventListener("pagehide", saveCache);

setInterval(renderTyping, 1000);

// -- start ----------------------------------------------------------------------------------------

async function start() {
  const meAvatar = $("me-avatar");
  meAvatar.textContent = initials(me);
  meAvatar.style.setProperty("--hue", hue(me));
  for (const entry of relay.pending()) pending.set(entry.client_msg_id, entry);
  // Drawn before the server answers (it may be out of reach: a reload while offline): the
  // cached conversations, the current one, and the outbox in it.
  const cached = restoreCache();
  for (const entry of pending.values()) room(keyOf(entry.to, me));
  const wanted = decodeURIComponent(window.location.hash.slice(1));
  current = rooms.has(wanted) ? wanted : rooms.has(cached) ? cached : null;
  render();
  // Registered before history is read: every later message is in this tab's queue, and
  // anything in both is one message by id.
  await relay.connect();
  const notices = loadHistory(NOTICES).catch((error) => {
    console.warn("chat: could not load the server's notices", error);
  });
  await Promise.all([loadRooms(), loadDirects(), notices]);
  saveCache();
  const roomNames = [...rooms.values()].filter((r) => r.kind === "room").map((r) => r.name);
  let first = roomNames.sort()[0];
  if (rooms.has(wanted)) first = wanted;
  if (current && rooms.has(current)) first = current;
  if (first) await select(first);
  else {
    current = null;
    render();
  }
}

start();
