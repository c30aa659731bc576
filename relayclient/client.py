"""
One tab of the protocol as an asyncio object: persistent client id, an outbox retried until the
server says `sent`, deliveries processed once and in seq order, cumulative batched acks, resync
over HTTP on a gap, reconnects with backoff and jitter, and HTTP when the socket stays down.
"""

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import Callable
from typing import Any

import websockets

from relayclient.http import HttpSession

logger = logging.getLogger(__name__)

# Errors a retry cannot cure: the send is dropped from the outbox and its waiter fails.
PERMANENT = {
    "malformed",
    "malformed_json",
    "invalid_client_msg_id",
    "invalid_to",
    "invalid_room",
    "invalid_body",
    "body_too_large",
    "unknown_user",
    "unknown_room",
    "not_a_member",
}


class SendFailed(Exception):
    """
    The server refused a send for good (its error code is `code`).
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class RelayClient:
    """
    One tab. `state` (a dict the caller may persist between runs, like a tab's sessionStorage)
    holds client_id, last_seq and the outbox; `on_message(seq, message)` sees every delivery
    once, in order.
    """

    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        *,
        state: dict | None = None,
        on_message: Callable[[int, dict], None] | None = None,
        on_frame: Callable[[dict], None] | None = None,
        ack_delay: float = 0.2,
        ack_every: int = 50,
        http_fallback_after: float = 3.0,
        ping_interval: float = 15.0,
        backoff: tuple[float, float] = (0.1, 3.0),
        keepalive: float | None = 20.0,
        alternates: list[str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.ws_url = "ws" + self.base_url[4:]
        # More servers of one deployment: each (re)connect picks one of ws_urls at random, and
        # HTTP calls move on to the next server when one refuses connections.
        self.ws_urls = ["ws" + url.rstrip("/")[4:] for url in alternates or []]
        self.keepalive = keepalive
        self.rng = rng or random.Random()
        self.username, self.password = username, password
        self.http = HttpSession(self.base_url, alternates=alternates)
        self.state = state if state is not None else {}
        self.state.setdefault("last_seq", 0)
        self.state.setdefault("outbox", {})
        self.on_message = on_message
        self.on_frame = on_frame
        # Acks are cumulative: one every ack_delay seconds, or at once when ack_every deliveries
        # are unacked (relay.js does the same: 200 ms, 50).
        self.ack_delay, self.ack_every, self.ping_interval = ack_delay, ack_every, ping_interval
        self.http_fallback_after, self.backoff = http_fallback_after, backoff
        self.status = "offline"
        self.ws: Any = None
        self.head = 0
        self._pong_head = 0
        self._last_frame_at = 0.0  # event-loop time of the socket's latest frame
        self.resync_required = False
        self._acked = 0
        self._acking_now = False
        self._ack_task: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self._waiters: dict[str, asyncio.Future] = {}
        self._lock = asyncio.Lock()
        self._down_since = 0.0
        self._drop_deliveries = 0
        self._background: set[asyncio.Task] = set()
        self._stopping = False
        self.stats = {
            "connects": 0,
            "resyncs": 0,
            "duplicates_dropped": 0,
            "http_sends": 0,
            "send_retries": 0,
        }

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def client_id(self) -> str | None:
        """
        This tab's persistent client id.
        """
        return self.state.get("client_id")

    @property
    def last_seq(self) -> int:
        """
        The last seq processed.
        """
        return int(self.state["last_seq"])

    async def start(self) -> None:
        """
        Log in (unless the session already holds a login, as a browser's other tabs share
        one), register a client if there is none yet, and keep a socket open in the background.
        """
        self._stopping = False  # started again after a stop(): a tab back from offline
        if not self.http.cookie("sessionid"):
            await self.http.login(self.username, self.password)
        if not self.client_id:
            await self._register()
        self._down_since = asyncio.get_running_loop().time()
        self._tasks = [
            asyncio.create_task(self._connection_loop()),
            asyncio.create_task(self._fallback_loop()),
        ]

    async def stop(self) -> None:
        """
        Stop the background work and close the socket (the client and its queue stay).
        """
        self._stopping = True
        others = [t for t in (self._ack_task, *self._background) if t]
        for task in others:
            task.cancel()
        # CPython 3.11's asyncio.wait_for can swallow a cancellation that arrives just as its
        # awaitable completes (fixed in 3.12): cancel until the tasks are really done.
        pending = [t for t in self._tasks if not t.done()]
        for _ in range(100):
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.1)
            pending = [t for t in pending if not t.done()]
        for task in self._tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a failure at shutdown is not news
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        self.status = "offline"

    async def _register(self) -> None:
        status, body = await self.http.request("POST", "/api/clients/")
        if status != 201:
            raise RuntimeError(f"registering a client failed: {status} {body}")
        self.state.update(client_id=body["client_id"], last_seq=0, conn=0)
        self._acked = 0

    # -- sending --------------------------------------------------------------------------------

    async def send(self, to: dict, body: Any, client_msg_id: str | None = None) -> str:
        """
        Queue a message in the outbox and send it if connected; returns its client_msg_id.
        """
        cmid = client_msg_id or uuid.uuid4().hex
        self.state["outbox"][cmid] = {"to": to, "body": body}
        self._waiters.setdefault(cmid, asyncio.get_running_loop().create_future())
        if self.ws is not None and self.status == "online":
            with contextlib.suppress(Exception):
                await self._send_frame(cmid)
        return cmid

    async def wait_sent(self, cmid: str, timeout: float = 30) -> dict:
        """
        Wait until the server stored `cmid`: {"id", "duplicate"}; SendFailed if it refused.
        """
        future = self._waiters.setdefault(cmid, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(asyncio.shield(future), timeout)

    async def _send_frame(self, cmid: str) -> None:
        item = self.state["outbox"].get(cmid)
        if item is not None:
            await self.ws.send(json.dumps({"type": "send", "client_msg_id": cmid, **item}))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resend_later(self, cmid: str) -> None:
        await asyncio.sleep(self.backoff[0] * (1 + self.rng.random()) * 5)
        if cmid in self.state["outbox"] and self.ws is not None and self.status == "online":
            with contextlib.suppress(Exception):
                await self._send_frame(cmid)

    def _settle(self, cmid: str, result: dict | None = None, error: SendFailed | None = None):
        self.state["outbox"].pop(cmid, None)
        future = self._waiters.get(cmid)
        if future is not None and not future.done():
            if error is not None:
                future.set_exception(error)
                future.exception()  # retrieved: nobody has to wait for it
            else:
                future.set_result(result)

    # -- the socket -----------------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        delay = self.backoff[0]
        while not self._stopping:
            self.status = "connecting" if self.stats["connects"] == 0 else "reconnecting"
            code = None
            try:
                base = self.rng.choice(self.ws_urls) if self.ws_urls else self.ws_url
                # Each attempt gets a higher number, kept with the client id: an attempt this
                # tab gave up on that reaches the server late cannot supersede a newer socket.
                attempt = self.state["conn"] = int(self.state.get("conn", 0)) + 1
                url = (
                    f"{base}/ws/?client_id={self.client_id}&after={self.last_seq}&conn={attempt}"
                )
                # The Origin of the server this socket goes to, as a page served by it would
                # send (the server compares scheme, host and port).
                origin = "http" + base[2:]
                headers = {"Cookie": self.http.cookie_header(), "Origin": origin}
                async with websockets.connect(
                    url,
                    additional_headers=headers,
                    max_size=2**21,
                    open_timeout=10,
                    ping_interval=self.keepalive,
                    ping_timeout=self.keepalive,
                ) as ws:
                    self.ws = ws
                    await self._session(ws)
                    delay = self.backoff[0]
            except websockets.ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else None
            except (TimeoutError, OSError, websockets.InvalidHandshake) as exc:
                logger.debug("connect failed: %s", exc)
            finally:
                self.ws = None
                if self.status == "online":
                    self._down_since = asyncio.get_running_loop().time()
                self.status = "reconnecting"
            if code == 4429:
                # Evicted for a newer client of this user (CLIENTS_MAX_PER_USER). Registering
                # again at once would evict another live client, which would do the same: stop,
                # and let the program start() again (that registers a new client).
                logger.warning(
                    "client %s evicted for a newer client (4429): stopped", self.client_id
                )
                self.state.pop("client_id", None)
                self._stopping = True
                self.status = "evicted"
                return
            try:
                if code in (4404, 4409):
                    # Deleted, or a duplicated tab whose id another tab holds: become a new tab.
                    logger.warning(
                        "client %s closed with %s: registering a new client", self.client_id, code
                    )
                    await self._register()
                    delay = self.backoff[0]
                    continue
                if code == 4401:
                    await self.http.login(self.username, self.password)
            except (OSError, RuntimeError) as exc:
                logger.info("recovering from close code %s failed (%s); retrying", code, exc)
            await asyncio.sleep(delay * (0.5 + self.rng.random()))
            delay = min(delay * 2, self.backoff[1])

    async def _session(self, ws: Any) -> None:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if hello.get("type") != "hello":
            logger.warning("expected hello, got %r; reconnecting", hello)
            return
        self.status = "online"
        self.stats["connects"] += 1
        self.head = hello["head"]
        # Repeated even if it was sent: an ack whose write failed after the old socket went away
        # got no error frame.
        if self.last_seq > 0:
            await ws.send(json.dumps({"type": "ack", "seq": self.last_seq}))
        self._acked = self.last_seq
        for cmid in list(self.state["outbox"]):
            await self._send_frame(cmid)
        # A ping after ping_interval without a frame, from a task of its own: a timeout around
        # every receive (asyncio.wait_for: a task and a timer per frame) was a third of this
        # client's time per delivery.
        loop = asyncio.get_running_loop()
        self._last_frame_at = loop.time()
        pinger = loop.create_task(self._ping_when_quiet(ws))
        try:
            while not self._stopping:
                raw = await ws.recv()
                self._last_frame_at = loop.time()
                await self._on_frame(json.loads(raw))
        finally:
            pinger.cancel()

    async def _ping_when_quiet(self, ws: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            quiet = loop.time() - self._last_frame_at
            if quiet < self.ping_interval:
                await asyncio.sleep(self.ping_interval - quiet)
                continue
            self._last_frame_at = loop.time()
            try:
                await ws.send('{"type":"ping"}')
            except websockets.ConnectionClosed:
                return  # the receive loop sees it too

    async def _on_frame(self, frame: dict) -> None:
        kind = frame.get("type")
        if kind == "delivery":
            if self._drop_deliveries:
                self._drop_deliveries -= 1  # a fault injected by a test or the chaos tool
                return
            await self._on_delivery(frame["seq"], frame["message"])
        elif kind == "sent":
            self._settle(
                frame["client_msg_id"], {"id": frame["id"], "duplicate": frame["duplicate"]}
            )
        elif kind == "error":
            code = frame.get("code")
            if code == "resync_required":
                self.resync_required = True
            elif frame.get("client_msg_id") and code in PERMANENT:
                self._settle(
                    frame["client_msg_id"], error=SendFailed(code, str(frame.get("detail")))
                )
            elif frame.get("client_msg_id") in self.state["outbox"]:
                # Rate limited, or the server failed for now: the same send again, later.
                self.stats["send_retries"] += 1
                self._spawn(self._resend_later(frame["client_msg_id"]))
            elif code in ("internal_error", "unavailable"):
                # An ack that could not be written: sent again after the usual delay.
                self._acked = 0
                if self.last_seq and (self._ack_task is None or self._ack_task.done()):
                    self._ack_task = asyncio.create_task(self._ack_soon(self.ack_delay))
        elif kind == "pong":
            # Behind the head of the previous pong still, a ping interval later: those
            # deliveries are not on their way (their push was lost); fetch them. Behind only
            # this pong's head may just be deliveries in flight.
            if self.last_seq < self._pong_head:
                await self._resync()
            self.head = frame["head"]
            self._pong_head = self.head
        if self.on_frame is not None:
            self.on_frame(frame)

    async def _on_delivery(self, seq: int, message: dict) -> None:
        if seq <= self.last_seq:
            self.stats["duplicates_dropped"] += 1
            return
        if seq > self.last_seq + 1:
            # A jump: fetch what is missing over HTTP. Live frames wait unread on the socket
            # meanwhile and are dropped as duplicates afterwards if the resync covered them.
            await self._resync()
            if seq <= self.last_seq:
                self.stats["duplicates_dropped"] += 1
                return
            if seq > self.last_seq + 1:
                return  # still missing: the next pong or resync fills it in
        self._accept(seq, message)

    def _accept(self, seq: int, message: dict) -> None:
        self.state["last_seq"] = seq
        self.head = max(self.head, seq)
        if self.on_message is not None:
            self.on_message(seq, message)
        if seq - self._acked >= self.ack_every and not self._acking_now:
            self._acking_now = True
            self._spawn(self._ack_soon(0))
        elif self._ack_task is None or self._ack_task.done():
            self._ack_task = asyncio.create_task(self._ack_soon(self.ack_delay))

    async def _ack_soon(self, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            await self._ack_last()
        finally:
            if delay == 0:
                self._acking_now = False

    async def _ack_last(self) -> None:
        seq = self.last_seq
        if seq <= self._acked:
            return
        if self.ws is not None and self.status == "online":
            with contextlib.suppress(Exception):
                await self.ws.send(json.dumps({"type": "ack", "seq": seq}))
                self._acked = seq
        else:
            with contextlib.suppress(OSError):
                status, _ = await self.http.request(
                    "POST", f"/api/clients/{self.client_id}/ack", {"seq": seq}
                )
                if status == 200:
                    self._acked = seq

    async def _resync(self) -> None:
        async with self._lock:
            self.stats["resyncs"] += 1
            while True:
                status, page = await self.http.request(
                    "GET", f"/api/clients/{self.client_id}/messages?after={self.last_seq}&limit=500"
                )
                if status != 200:
                    return
                self.head = page["head"]
                self.resync_required = bool(page.get("resync_required"))
                fresh = [d for d in page["deliveries"] if d["seq"] > self.last_seq]
                for delivery in fresh:
                    if delivery["seq"] != self.last_seq + 1:
                        return  # a gap the server no longer holds (acked elsewhere)
                    self._accept(delivery["seq"], delivery["message"])
                if not fresh:
                    return

    # -- without a socket -----------------------------------------------------------------------

    async def _fallback_loop(self) -> None:
        """
        While the socket has been down for http_fallback_after seconds: send the outbox and
        pull deliveries over HTTP (real time is a bonus; delivery is not).
        """
        while not self._stopping:
            await asyncio.sleep(self.http_fallback_after / 2)
            loop = asyncio.get_running_loop()
            if self.status == "online" or loop.time() - self._down_since < self.http_fallback_after:
                continue
            try:
                await self._over_http()
            except OSError as exc:
                logger.debug("HTTP fallback failed (%s); trying again", exc)

    async def _over_http(self) -> None:
        # Outbox first (so our own messages come back in the resync), then deliveries, then ack.
        for cmid, item in list(self.state["outbox"].items()):
            status, body = await self.http.request(
                "POST",
                "/api/messages/",
                {"client_id": self.client_id, "client_msg_id": cmid, **item},
            )
            self.stats["http_sends"] += 1
            if status in (200, 201):
                self._settle(cmid, {"id": body["id"], "duplicate": body["duplicate"]})
            elif (
                400 <= status < 500 and status != 429 and isinstance(body, dict) and "error" in body
            ):
                code = body["error"]["code"]
                if code in PERMANENT:
                    self._settle(cmid, error=SendFailed(code, body["error"]["detail"]))
        await self._resync()
        if self.last_seq > self._acked:
            await self._ack_last()

    async def sync(self) -> int:
        """
        Catch up over HTTP now and ack what was processed; returns how many deliveries it found.
        """
        before = self.last_seq
        await self._resync()
        if self.last_seq > 0:  # even if acked already: that ack may have failed on the server
            status, _ = await self.http.request(
                "POST", f"/api/clients/{self.client_id}/ack", {"seq": self.last_seq}
            )
            if status == 200:
                self._acked = self.last_seq
        return self.last_seq - before

    def inject_drop(self, count: int = 1) -> None:
        """
        Fault injection: lose the next `count` delivery frames in transit (as a full channel
        layer would); the client must notice the gap and recover.
        """
        self._drop_deliveries += count
