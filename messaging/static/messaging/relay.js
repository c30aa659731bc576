// Tab relay browser client: one RelayClient per tab, speaking protocol v1 (../shared/protocol.md).
//
// It keeps the tab's client id, the last seq it processed and its outbox in sessionStorage, so a
// reload keeps the same client, its queue and its unsent messages. Plain ES module, no build step:
//
//   import { RelayClient } from "/static/messaging/relay.js";
//   const relay = new RelayClient();
//   relay.on("message", (message) => show(message));
//   relay.on("state", ({ state }) => showState(state));
//   await relay.connect();
//   relay.send({ room: "lobby" }, { text: "hello" });
//
// See docs/browser-client.md for the whole API.

const DEFAULTS = {
  baseUrl: "", // same origin
  storageKey: "relay", // sessionStorage key prefix (one RelayClient per prefix and tab)
  ackDelay: 200, // ms: acks are batched (cumulative) ...
  ackEvery: 50, // ... but sent at once when this many are unacked
  pingInterval: 20000, // ms between pings while online
  pongTimeout: 10000, // ms without a pong (or hello) after which the socket counts as dead
  httpFallbackAfter: 3000, // ms the socket must be down before the outbox goes over HTTP
  retryInterval: 4000, // ms before an unanswered send is sent again
  backoffBase: 500, // ms: reconnect delays grow from here ...
  backoffMax: 10000, // ... up to here, with jitter
  resyncPage: 500, // deliveries per HTTP resync request
};

// Error codes for a send that no retry can fix: the entry leaves the outbox as failed.
const PERMANENT = new Set([
  "malformed",
  "invalid_client_msg_id",
  "invalid_to",
  "invalid_room",
  "invalid_body",
  "body_too_large",
  "unknown_user",
  "unknown_room",
  "not_a_member",
]);

function randomId() {
  if (globalThis.crypto?.randomUUID) {
    return crypto.randomUUID(); // secure contexts only (https, localhost)
  }
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The value of the csrftoken cookie (Django's CSRF token), or "". */
export function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

/** An HTTP answer that is not a 2xx: status and the protocol's error code. */
export class HttpError extends Error {
  constructor(status, code, detail) {
    super(`${status} ${code}: ${detail}`);
    this.status = status;
    this.code = code;
  }
}

export class RelayClient {
  /** A client for this tab; nothing happens on the network until connect(). */
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options };
    this.storage = options.storage ?? window.sessionStorage;
    this.state = "offline";
    this.listeners = new Map();
    this.stats = { processed: 0, duplicates: 0, gaps: 0, resyncs: 0, reconnects: 0 };
    this.clientId = this._load("client", null);
    this.lastSeq = this.clientId ? Number(this._load("seq", 0)) : 0;
    this.outbox = JSON.parse(this._load("outbox", "[]"));
    this.ackedSeq = 0;
    this.ws = null;
    this.online = false; // a hello arrived on the current socket
    this.stopped = true;
    this.hidden = false; // between pagehide and pageshow
    this.evicted = false; // closed with 4429: waits for send() or resume() before registering again
    this.attempt = 0;
    this.downSince = Date.now();
    this.resyncing = false;
    this.buffer = []; // live deliveries held while an HTTP resync runs
    this.timers = {};
    this._lifecycleInstalled = false;
  }

  // -- page author API ------------------------------------------------------------------------

  /** Listen to an event: message, state, sent, pending, failed, presence, typing, client, resync, loggedout, error. */
  on(event, handler) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(handler);
    return () => this.off(event, handler);
  }

  off(event, handler) {
    this.listeners.get(event)?.delete(handler);
  }

  /** Register a client if this tab has none, then open the socket; resolves once registered. */
  connect() {
    if (!this.stopped) return this.ready;
    this.stopped = false;
    this._installLifecycle();
    this._setState("connecting");
    this.timers.tick = setInterval(() => this._tick(), 1000);
    this.ready = this._ensureClient().then(() => this._open());
    return this.ready;
  }

  /** Stop: close the socket and stop retrying (the client and its outbox stay in sessionStorage). */
  disconnect() {
    this.stopped = true;
    clearInterval(this.timers.tick);
    clearTimeout(this.timers.reconnect);
    this._closeSocket();
    this._setState("offline");
  }

  /** Queue a message for `to` ({room} or {user}); returns its client_msg_id. Kept until the server answers sent. */
  send(to, body) {
    const entry = {
      client_msg_id: randomId(),
      client_id: this.clientId,
      to,
      body,
      created: new Date().toISOString(),
      sentAt: 0,
    };
    this.outbox.push(entry);
    this._saveOutbox();
    this._emit("pending", { ...entry });
    if (this.evicted) this.resume();
    this._trySend(entry);
    return entry.client_msg_id;
  }

  /** After an eviction (state "evicted", close code 4429): register a new client and reconnect. */
  resume() {
    if (!this.evicted || this.stopped) return Promise.resolve();
    this.evicted = false;
    this._setState("reconnecting");
    return this._replaceClient("evicted");
  }

  /** Tell the other members of `room` that this user is typing (ephemeral; dropped when offline). */
  typing(room) {
    this._sendFrame({ type: "typing", room });
  }

  /** The unsent messages, oldest first (copies). */
  pending() {
    return this.outbox.map((entry) => ({ ...entry }));
  }

  /**
   * The history of a conversation, newest last: `to` is {room} or {user} (the direct messages
   * between this user and that one). What a resync may have skipped is here.
   */
  async history(to, { before, limit = 100 } = {}) {
    const path = to.room !== undefined
      ? `/api/rooms/${encodeURIComponent(to.room)}/messages`
      : `/api/direct/${encodeURIComponent(to.user)}/messages`;
    const query = new URLSearchParams({ limit: String(limit) });
    if (before !== undefined) query.set("before", String(before));
    return (await this.request("GET", `${path}?${query}`)).messages;
  }

  /** The messages the server published to this user (not to a room), newest last. */
  async notices({ before, limit = 100 } = {}) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (before !== undefined) query.set("before", String(before));
    return (await this.request("GET", `/api/notices/?${query}`)).messages;
  }

  /** The users this user has direct messages with, newest first: [{user, last_id}]. */
  async conversations({ limit = 100 } = {}) {
    return (await this.request("GET", `/api/direct/?limit=${limit}`)).conversations;
  }

  /** GET/POST a protocol URL as JSON with the CSRF header; throws HttpError on a non-2xx answer. */
  async request(method, path, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET") headers["X-CSRFToken"] = csrfToken();
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(this.options.baseUrl + path, {
      method,
      headers,
      credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const error = data?.error ?? {};
      const failure = new HttpError(response.status, error.code ?? "http_error", error.detail ?? "");
      if (response.status === 401) this._loggedOut();
      throw failure;
    }
    return data;
  }

  // -- registration ---------------------------------------------------------------------------

  async _ensureClient() {
    while (!this.clientId && !this.stopped) {
      try {
        const created = await this.request("POST", "/api/clients/");
        this._setClient(created.client_id);
        this._emit("client", { clientId: this.clientId, reason: "registered" });
      } catch (error) {
        if (error instanceof HttpError && error.status < 500 && error.status !== 429) {
          this._loggedOut();
          return;
        }
        await this._sleep(this._backoff());
      }
    }
  }

  _setClient(clientId) {
    this.clientId = clientId;
    this.lastSeq = 0;
    this.ackedSeq = 0;
    this.buffer = [];
    this._save("client", clientId);
    this._save("seq", 0);
    this._save("conn", 0);
  }

  async _replaceClient(reason) {
    // The old client is gone (4404) or belongs to another live tab (4409): start a new one.
    // Its messages may be missing from the new queue, so the page is told to reload history.
    const previous = this.clientId;
    this.clientId = null;
    this._storageRemove("client");
    await this._ensureClient();
    if (!this.clientId) return;
    this._emit("client", { clientId: this.clientId, previous, reason });
    this._emit("resync", { reason });
    this._open();
  }

  // -- the socket -----------------------------------------------------------------------------

  _open() {
    if (this.stopped || this.hidden || this.ws || !this.clientId) return;
    const base = new URL(this.options.baseUrl || window.location.href, window.location.href);
    const scheme = base.protocol === "https:" ? "wss:" : "ws:";
    // Each attempt gets a higher number, kept beside the client id: an attempt this tab gave
    // up on that reaches the server late is refused instead of superseding a newer socket.
    const attempt = Number(this._load("conn", 0)) + 1;
    this._save("conn", attempt);
    const url = `${scheme}//${base.host}/ws/?client_id=${encodeURIComponent(this.clientId)}&after=${this.lastSeq}&conn=${attempt}`;
    let ws;
    try {
      ws = new WebSocket(url);
    } catch {
      this._scheduleReconnect();
      return;
    }
    this.ws = ws;
    this.online = false;
    this.openedAt = Date.now();
    ws.onmessage = (event) => {
      if (ws !== this.ws) return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this._onFrame(frame);
    };
    ws.onclose = (event) => this._onClose(ws, event.code);
  }

  _closeSocket() {
    const ws = this.ws;
    this.ws = null;
    this.online = false;
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      try {
        ws.close(1000);
      } catch {
        // already closed
      }
    }
  }

  _sendFrame(frame) {
    if (!this.online || this.ws?.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  _onClose(ws, code) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.online = false;
    this.downSince ??= Date.now();
    if (this.stopped || this.hidden) return;
    if (code === 4401) {
      this._loggedOut();
    } else if (code === 4409) {
      console.warn(
        `relay: client ${this.clientId} was taken over by another tab (a duplicated tab ` +
          "copies sessionStorage); registering a new client for this tab",
      );
      this._setState("reconnecting");
      this._replaceClient("duplicated");
    } else if (code === 4429) {
      // Evicted for a newer tab of this user (the server keeps CLIENTS_MAX_PER_USER). Registering
      // again at once would evict another live tab, which would do the same: this tab waits
      // until it is used again (send() or resume()). Its outbox is kept and sent then.
      console.info(`relay: client ${this.clientId} evicted for a newer tab (4429)`);
      this.clientId = null;
      this._storageRemove("client");
      this.evicted = true;
      this._setState("evicted");
    } else if (code === 4404 || code === 4403 || code === 4400) {
      console.info(`relay: client ${this.clientId} refused (${code}); registering a new client`);
      this._setState("reconnecting");
      this._replaceClient(code === 4404 ? "deleted" : "refused");
    } else {
      this._scheduleReconnect();
    }
  }

  _scheduleReconnect() {
    if (this.stopped || this.hidden) return;
    this._setState(navigator.onLine === false ? "offline" : "reconnecting");
    clearTimeout(this.timers.reconnect);
    this.timers.reconnect = setTimeout(() => {
      this.stats.reconnects += 1;
      this._open();
    }, this._backoff());
  }

  _backoff() {
    // Exponential with "equal jitter": half fixed, half random, so tabs do not reconnect in step.
    const ceiling = Math.min(this.options.backoffMax, this.options.backoffBase * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 20);
    return ceiling / 2 + (Math.random() * ceiling) / 2;
  }

  _reconnectNow() {
    // The browser says the network is back: skip the rest of the backoff.
    if (this.stopped || this.hidden || this.ws) return;
    clearTimeout(this.timers.reconnect);
    this.attempt = 0;
    this._setState("reconnecting");
    this._open();
  }

  // -- frames ---------------------------------------------------------------------------------

  _onFrame(frame) {
    switch (frame.type) {
      case "hello":
        this.online = true;
        this.attempt = 0;
        this.downSince = null;
        this.pingAt = 0;
        this.lastPingAt = Date.now();
        this._setState("online");
        // Repeated even if it was sent: an ack whose write failed after the old socket went
        // away got no error frame.
        if (this.lastSeq > 0) {
          this.ackedSeq = 0;
          this._flushAck();
        }
        for (const entry of this.outbox) this._trySend(entry, true);
        break;
      case "delivery":
        this.deliveredSincePing = true;
        this._incoming({ seq: frame.seq, message: frame.message });
        break;
      case "sent":
        this._settle(frame.client_msg_id, frame.id, frame.duplicate);
        break;
      case "error":
        this._onError(frame);
        break;
      case "pong":
        this._onPong(frame.head);
        break;
      case "presence":
        this._emit("presence", { user: frame.user, online: frame.online });
        break;
      case "typing":
        this._emit("typing", { room: frame.room, user: frame.user });
        break;
      default:
        break;
    }
  }

  _onError(frame) {
    if (frame.code === "resync_required") {
      this._queueLimitResync();
      return;
    }
    if (frame.client_msg_id && PERMANENT.has(frame.code)) {
      this._fail(frame.client_msg_id, frame.code, frame.detail);
      return;
    }
    if (!frame.client_msg_id && (frame.code === "unavailable" || frame.code === "internal_error")) {
      // Not about a send: an ack that could not be written. Acked again after the usual delay
      // (not at once: while the database is down that would be a loop of acks and errors).
      this.ackedSeq = 0;
      if (this.lastSeq > 0 && !this.timers.ack) {
        this.timers.ack = setTimeout(() => this._flushAck(), this.options.ackDelay);
      }
    }
    // rate_limited, internal_error...: the outbox retries that send later.
    this._emit("error", { code: frame.code, detail: frame.detail, client_msg_id: frame.client_msg_id });
  }

  // -- incoming: each seq once, in order ------------------------------------------------------

  _incoming(delivery) {
    if (this.resyncing) {
      this.buffer.push(delivery);
      return;
    }
    if (delivery.seq <= this.lastSeq) {
      this.stats.duplicates += 1;
      return;
    }
    if (delivery.seq > this.lastSeq + 1) {
      this.stats.gaps += 1;
      this.buffer.push(delivery);
      this._resync("gap");
      return;
    }
    this._process(delivery);
  }

  _process(delivery) {
    // Persist first: a reload right after the handlers ran must not see this seq again.
    this.lastSeq = delivery.seq;
    this._save("seq", this.lastSeq);
    this.stats.processed += 1;
    this._emit("message", delivery.message, { seq: delivery.seq });
    this._scheduleAck();
  }

  async _resync(reason) {
    // Fetch what is missing over HTTP while live frames wait in the buffer, then merge them.
    if (this.resyncing || !this.clientId) return;
    this.resyncing = true;
    this.stats.resyncs += 1;
    const clientId = this.clientId;
    let outcome = "done";
    try {
      outcome = await this._fetchMissing(clientId);
    } catch (error) {
      outcome = error instanceof HttpError && error.status === 404 ? "gone" : "retry";
    }
    this.resyncing = false;
    if (clientId !== this.clientId || this.stopped) return;
    if (outcome === "gone") {
      this._closeSocket();
      this._replaceClient("deleted");
    } else if (outcome === "limit") {
      await this._queueLimitResync();
    } else if (outcome === "retry") {
      setTimeout(() => this._resync(reason), this.options.backoffBase * 2);
    } else {
      const held = this.buffer.sort((a, b) => a.seq - b.seq);
      this.buffer = [];
      for (const delivery of held) this._incoming(delivery);
    }
  }

  async _fetchMissing(clientId) {
    for (;;) {
      const page = await this.request(
        "GET",
        `/api/clients/${clientId}/messages?after=${this.lastSeq}&limit=${this.options.resyncPage}`,
      );
      if (clientId !== this.clientId) return "done";
      if (page.resync_required) return "limit";
      for (const delivery of page.deliveries) {
        if (delivery.seq <= this.lastSeq) continue;
        if (delivery.seq > this.lastSeq + 1) {
          // Deleted before this tab saw them (acked by a tab that shared this client): accept
          // the jump and let the page reload history.
          this._emit("resync", { reason: "jump" });
        }
        this._process(delivery);
      }
      if (page.deliveries.length === 0 || this.lastSeq >= page.head) return "done";
    }
  }

  async _queueLimitResync() {
    // The server stopped queueing for this client (docs/protocol.md, "Queue bound"): acking the head says
    // "I reloaded history"; the page reloads it on the resync event.
    if (this.limitResyncing) return;
    this.limitResyncing = true;
    try {
      const page = await this.request("GET", `/api/clients/${this.clientId}/messages?after=0&limit=1`);
      await this.request("POST", `/api/clients/${this.clientId}/ack`, { seq: page.head });
      this.lastSeq = Math.max(this.lastSeq, page.head);
      this.ackedSeq = this.lastSeq;
      this._save("seq", this.lastSeq);
      this.buffer = this.buffer.filter((delivery) => delivery.seq > this.lastSeq);
      this._emit("resync", { reason: "queue_limit", head: page.head });
    } catch {
      // Retried on the next resync_required (sent again at every connect).
    } finally {
      this.limitResyncing = false;
    }
  }

  _onPong(head) {
    this.pingAt = 0;
    // A higher head with nothing delivered since the ping: a real-time push was lost.
    if (head > this.lastSeq && !this.deliveredSincePing && !this.resyncing) this._resync("pong");
  }

  // -- acks -----------------------------------------------------------------------------------

  _scheduleAck() {
    if (this.lastSeq - this.ackedSeq >= this.options.ackEvery) {
      this._flushAck();
    } else if (!this.timers.ack) {
      this.timers.ack = setTimeout(() => this._flushAck(), this.options.ackDelay);
    }
  }

  _flushAck() {
    clearTimeout(this.timers.ack);
    this.timers.ack = null;
    const seq = this.lastSeq;
    if (seq <= this.ackedSeq) return;
    if (this._sendFrame({ type: "ack", seq })) {
      this.ackedSeq = seq;
    } else if (this.clientId && !this.hidden) {
      this.request("POST", `/api/clients/${this.clientId}/ack`, { seq }).then(
        () => {
          this.ackedSeq = Math.max(this.ackedSeq, seq);
        },
        () => {}, // acked again on the next hello
      );
    }
  }

  // -- outbox ---------------------------------------------------------------------------------

  _trySend(entry, force = false) {
    const now = Date.now();
    if (!entry.client_id) {
      if (!this.clientId) return; // queued before registration finished
      entry.client_id = this.clientId;
      this._saveOutbox();
    }
    if (!force && entry.sentAt && now - entry.sentAt < this.options.retryInterval) return;
    if (entry.client_id === this.clientId && this.online) {
      entry.sentAt = now;
      this._sendFrame({
        type: "send",
        client_msg_id: entry.client_msg_id,
        to: entry.to,
        body: entry.body,
      });
      return;
    }
    // Over HTTP when the socket has been down a while, and always for an entry made under an
    // earlier client id (a retry must carry the same client_id + client_msg_id to be deduped).
    const longDown = this.downSince && now - this.downSince >= this.options.httpFallbackAfter;
    if (entry.client_id !== this.clientId || longDown) this._httpSend(entry);
  }

  async _httpSend(entry) {
    if (entry.httpInFlight || !this.clientId) return;
    entry.httpInFlight = true;
    entry.sentAt = Date.now();
    try {
      const answer = await this.request("POST", "/api/messages/", {
        client_id: entry.client_id ?? this.clientId,
        client_msg_id: entry.client_msg_id,
        to: entry.to,
        body: entry.body,
      });
      this._settle(entry.client_msg_id, answer.id, answer.duplicate);
    } catch (error) {
      if (!(error instanceof HttpError)) return; // network: retried later
      if (error.status === 404 && error.code === "unknown_client") {
        // Its client is gone, so it cannot have been stored under it and kept: adopt it.
        entry.client_id = this.clientId;
        this._saveOutbox();
      } else if (PERMANENT.has(error.code) || error.status === 400 || error.status === 413) {
        this._fail(entry.client_msg_id, error.code, error.message);
      }
    } finally {
      entry.httpInFlight = false;
    }
  }

  _settle(clientMsgId, id, duplicate) {
    const index = this.outbox.findIndex((entry) => entry.client_msg_id === clientMsgId);
    if (index < 0) return; // already settled (answered over both socket and HTTP)
    const [entry] = this.outbox.splice(index, 1);
    this._saveOutbox();
    this._emit("sent", { ...entry, id, duplicate: Boolean(duplicate) });
  }

  _fail(clientMsgId, code, detail) {
    const index = this.outbox.findIndex((entry) => entry.client_msg_id === clientMsgId);
    if (index < 0) return;
    const [entry] = this.outbox.splice(index, 1);
    this._saveOutbox();
    this._emit("failed", { ...entry, code, detail });
  }

  // -- timers and page lifecycle --------------------------------------------------------------

  _tick() {
    if (this.stopped || this.hidden) return;
    const now = Date.now();
    for (const entry of this.outbox) this._trySend(entry);
    if (this.ws && !this.online && now - this.openedAt > this.options.pongTimeout) {
      this._dropSocket(); // no hello: a handshake stuck somewhere
    }
    if (!this.online) return;
    if (this.pingAt && now - this.pingAt > this.options.pongTimeout) {
      this._dropSocket(); // open but unresponsive
    } else if (!this.pingAt && now - this.lastPingAt >= this.options.pingInterval) {
      this.pingAt = now;
      this.lastPingAt = now;
      this.deliveredSincePing = false;
      this._sendFrame({ type: "ping" });
    }
  }

  _dropSocket() {
    const ws = this.ws;
    this._closeSocket();
    this.downSince ??= Date.now();
    if (ws) this._scheduleReconnect();
  }

  _installLifecycle() {
    if (this._lifecycleInstalled) return;
    this._lifecycleInstalled = true;
    window.addEventListener("pagehide", () => this._onPageHide());
    window.addEventListener("pageshow", (event) => {
      if (event.persisted && this.hidden) {
        this.hidden = false;
        this._reconnectNow();
      }
    });
    window.addEventListener("online", () => this._reconnectNow());
    window.addEventListener("offline", () => {
      if (!this.online) this._setState("offline");
    });
  }

  _onPageHide() {
    // Reload or close, we cannot tell: ask the server to forget this client after its grace
    // period unless it connects again (a reload does, within a second).
    if (this.stopped || !this.clientId) return;
    if (this.lastSeq > this.ackedSeq) this._sendFrame({ type: "ack", seq: this.lastSeq });
    this.hidden = true;
    const form = new FormData();
    form.append("csrfmiddlewaretoken", csrfToken());
    // The beacon names this page's last connection attempt: if it reaches the server after
    // the reloaded page's socket (a higher attempt) attached, the server ignores it.
    const conn = Number(this._load("conn", 0));
    navigator.sendBeacon(
      `${this.options.baseUrl}/api/clients/${this.clientId}/close?conn=${conn}`,
      form,
    );
    this._closeSocket();
  }

  _loggedOut() {
    if (this.stopped && this.state === "offline") return;
    this.stopped = true;
    clearInterval(this.timers.tick);
    clearTimeout(this.timers.reconnect);
    this._closeSocket();
    this._setState("offline");
    this._emit("loggedout", {});
  }

  // -- plumbing -------------------------------------------------------------------------------

  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this._emit("state", { state, previous });
  }

  _emit(event, ...args) {
    for (const handler of this.listeners.get(event) ?? []) {
      try {
        handler(...args);
      } catch (error) {
        console.error(`relay: a ${event} handler failed`, error);
      }
    }
  }

  _sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  _key(name) {
    return `${this.options.storageKey}:${name}`;
  }

  _load(name, fallback) {
    try {
      return this.storage.getItem(this._key(name)) ?? fallback;
    } catch {
      return fallback;
    }
  }

  _save(name, value) {
    try {
      this.storage.setItem(this._key(name), String(value));
    } catch {
      // storage full or disabled: the tab still works, it just forgets on reload
    }
  }

  _storageRemove(name) {
    try {
      this.storage.removeItem(this._key(name));
    } catch {
      // ignore
    }
  }

  _saveOutbox() {
    const stored = this.outbox.map(({ httpInFlight, ...entry }) => entry);
    this._save("outbox", JSON.stringify(stored));
  }
}
