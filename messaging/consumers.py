"""
The WebSocket transport: one socket per client (tab), as in the protocol's `/ws/` section.

The consumer parses frames, authorizes the socket once at connect and calls the service layer.
Pushes are pokes: the consumer reads deliveries above the last seq it sent from the database, so
lost, duplicated or reordered pokes can neither lose nor double a delivery.
"""

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from asgiref.sync import SyncToAsync
from channels.consumer import get_handler_name
from channels.exceptions import ChannelFull, StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.db import InterfaceError, OperationalError, connections

from clients import push
from clients import services as client_services
from clients import sessions as client_sessions
from clients.errors import Malformed, RateLimited, ServiceError
from clients.models import client_group, user_group
from messaging import acks, batching, conf, frames, metrics, sends, services, throttle, validation
from messaging.presence import online_peers
from messaging.wire import delivery_frame, dumps, parse_json

logger = logging.getLogger(__name__)


class _PoolThreadCall(SyncToAsync):
    """
    A database call in the default thread pool that keeps the thread's connection for its next
    call (unless it comes from a pool), unless the connection broke or was left inside a
    transaction.

    channels' database_sync_to_async closes it after every call under CONN_MAX_AGE = 0 (which
    HTTP needs: Django runs each request in a thread of its own, and their connections would
    pile up); these few threads live as long as the process, and reconnecting (SQLite: opening
    the file and its PRAGMAs) was a sixth of the server's time under load.
    """

    def thread_handler(self, loop: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().thread_handler(loop, *args, **kwargs)
        finally:
            for conn in connections.all(initialized_only=True):
                if not conn.settings_dict.get("OPTIONS", {}).get("pool"):
                    # No age limit for these threads' connections. With a connection pool
                    # (PostgreSQL) the connection goes back to it instead: held for good, up to
                    # one per pool thread (CPUs + 4) could drain the pool.
                    conn.close_at = None
                conn.close_if_unusable_or_obsolete()


def _db(func: Any, executor: Any = None) -> Any:
    """
    A consumer's database call, run in the default thread pool (or `executor`): each call is
    one short transaction of its own, so sockets need not queue behind one another in channels'
    single thread-sensitive thread.
    """
    return _PoolThreadCall(func, thread_sensitive=False, executor=executor)


# A server-side dependency is down for now: reconnect later (4000 + HTTP 503, like the
# protocol's other codes; daphne refuses RFC 6455's own 1013 from an application).
TRY_AGAIN_LATER = 4503

# How long a poke that arrives ahead of a gap waits for the missing one before the consumer
# reads the gap from the database, and how many such pokes it holds at most.
GAP_WAIT = 0.05
HOLD_MAX = 100
_background: set[asyncio.Task] = set()

CLOSE_SUPERSEDED = 4409
CLOSE_GONE = 4404
# Deleted to make room for a newer tab of its user (CLIENTS_MAX_PER_USER): unlike after a 4404,
# the tab must not register again by itself, or live tabs past the bound would evict each other.
CLOSE_EVICTED = 4429
CLOSE_KICKED = 1012
CLOSE_LOGGED_OUT = 4401
_MISSING = object()


def _background_task(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)  # held until done (the loop keeps only weak references)
    task.add_done_callback(_background.discard)


def _own_queue(receive: Any) -> asyncio.Queue | None:
    # The queue behind the server's `receive` when it is an asyncio.Queue's get (daphne's, and
    # the test communicator's).
    queue = getattr(receive, "__self__", None)
    if isinstance(queue, asyncio.Queue) and getattr(receive, "__func__", None) is asyncio.Queue.get:
        return queue
    return None


class _FromLayer:
    # A channel-layer message (or the error its receive raised) in the socket's queue.
    __slots__ = ("error", "message")

    def __init__(self, message: Any = None, error: BaseException | None = None) -> None:
        self.message, self.error = message, error


async def _dispatch_all(
    queue: asyncio.Queue, layer_receive: Any, dispatch: Callable[[Any], Awaitable[None]]
) -> None:
    """
    Dispatch the socket's messages (from the server's queue of them) and the channel layer's,
    one at a time, as channels' await_many_dispatch does. That one waits with a new task and an
    asyncio.wait per message: about half of the event loop's time per ack frame (py-spy,
    2026-12-02), and a fan-out to 1,000 tabs brings 1,000 acks. Here the layer's messages join
    the socket's queue, one at a time (the next is received once this one is dispatched, so a
    slow consumer still leaves them in the layer, where its capacity counts them), and the
    loop waits on that one queue.
    """
    dispatched = asyncio.Event()
    stopping = False

    async def pump() -> None:
        while True:
            try:
                message = await layer_receive()
            except Exception as exc:  # e.g. Redis went away: the consumer ends, as in channels
                queue.put_nowait(_FromLayer(error=exc))
                return
            except asyncio.CancelledError:
                if not stopping:  # cancelled from inside the layer: no silent end either
                    queue.put_nowait(_FromLayer(error=RuntimeError("channel layer receive ended")))
                raise
            dispatched.clear()
            queue.put_nowait(_FromLayer(message))
            await dispatched.wait()

    pumping = asyncio.get_running_loop().create_task(pump()) if layer_receive else None
    try:
        while True:
            message = await queue.get()
            if type(message) is _FromLayer:
                if message.error is not None:
                    raise message.error
                try:
                    await dispatch(message.message)
                finally:
                    dispatched.set()
            else:
                await dispatch(message)
    finally:
        stopping = True
        if pumping is not None:
            pumping.cancel()
            # Waited for briefly, not for good: a layer whose receive lingers after its
            # cancellation must not hold this consumer (or the server's shutdown) up.
            await asyncio.wait({pumping}, timeout=1.0)
            if pumping.done() and not pumping.cancelled():
                pumping.exception()  # retrieved: it ended the consumer already, or nothing did


class DeliveryConsumer(AsyncWebsocketConsumer):
    """
    Pushes a client's deliveries in seq order and takes its sends, acks, typing and pings.
    """

    client_id: uuid.UUID
    user: Any = None  # the scope's user, set at connect
    sent_seq = 0
    attached = False
    closing = False
    gap_check_until = 0.0  # event-loop time until which a scheduled gap check is awaited
    last_ack: asyncio.Future | None = None  # the write of the socket's latest ack
    _loop: asyncio.AbstractEventLoop | None = None  # set once the socket takes pokes directly
    _direct: frames.Writer | None = None  # writes delivery frames itself, under daphne
    _flushing: asyncio.Task | None = None  # a catch-up started by a poke (_flush_soon)
    _flush_again = False
    _queue: asyncio.Queue | None = None  # the socket's queue of messages, when _dispatch_all runs
    _holds_router = False  # counted as an owner of this loop's router (push.start_router)
    _session_digest = ""  # names the socket's login session in clients.logout events
    _watch: client_sessions.SessionWatch | None = None  # re-checks that session (clients.sessions)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: dict[int, tuple[int, str]] = {}  # pokes that came ahead of a gap, by seq
        self.throttle = throttle.SocketThrottle()  # typing and ping frames

    async def dispatch(self, message: dict) -> None:
        # channels' dispatch first hops to the thread-sensitive thread to close old database
        # connections, for every message: a thread round trip per poke (200 per message to a
        # 200-tab room), all queued on one thread. This consumer's database calls run in the
        # pool and manage their own connections (_PoolThreadCall): no hop needed.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)

    # -- connection -------------------------------------------------------------------------

    async def connect(self) -> None:
        # Close codes only reach the browser after accept (else daphne answers HTTP 403).
        await self.accept()
        self._direct = frames.writer_for(self.base_send)
        frames.install_reader(self.base_send)
        # This process's receiver of batched pokes runs before any can be addressed to it, and
        # for as long as this socket lives (stopped in __call__'s finally, with the last one).
        self._holds_router = push.start_router()
        self.user = self.scope.get("user")
        try:
            client_services.require_user(self.user)
            client_id, after, attempt = self._parse_query()
            attachment = await self._attach_client(client_id, attempt)
        except ServiceError as exc:
            logger.info("websocket refused (%s): %s", exc.close_code, exc.detail)
            await self._close(exc.close_code)
            return
        except (OperationalError, InterfaceError) as exc:
            logger.warning("websocket refused, database unavailable: %s", exc)
            await self._close(TRY_AGAIN_LATER)
            return
        self.client_id = client_id
        self.sent_seq = after
        self.attached = True
        try:
            await self._join_groups()
            if attachment.previous_channel:
                # Another socket held this client (a duplicated tab, or a reconnect before the
                # old socket noticed): it is superseded, on whichever process it lives. A full
                # channel there is a consumer that stopped reading: nothing to supersede.
                with contextlib.suppress(ChannelFull):
                    await self.channel_layer.send(
                        attachment.previous_channel, {"type": "clients.supersede"}
                    )
        except Exception as exc:
            # The channel layer is down (a Redis restart): without it this socket would never
            # be poked. The tab reconnects; its deliveries wait in the database.
            logger.warning("websocket closed, channel layer unavailable: %r", exc)
            await self._close(TRY_AGAIN_LATER)
            return
        client = attachment.client
        self._watch_session()
        await self._send_json({"type": "hello", "client_id": str(client.id), "head": client.head})
        self._loop = asyncio.get_running_loop()
        push.local_receivers[self.channel_name] = self.take_poke
        await self._flush()
        if client.resync_required:
            await self._send_resync()
        try:
            peers = await self._online_peers()
        except (OperationalError, InterfaceError) as exc:
            # Presence is ephemeral: the socket goes on without it (a chaos run's PostgreSQL
            # kill here closed the socket with 1011).
            logger.warning("presence unavailable for client %s: %s", client_id, exc)
            peers = []
        for name in peers:
            await self._send_json({"type": "presence", "user": name, "online": True})

    def _parse_query(self) -> tuple[uuid.UUID, int, int | None]:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        raw_id = query.get("client_id", [None])[-1]
        try:
            client_id = uuid.UUID(raw_id or "")
        except ValueError:
            raise Malformed("client_id must be a client UUID", code="malformed_query") from None
        try:
            after = validation.int_param(query.get("after", [None])[-1], "after", default=0)
            # The tab's connection attempt number (optional): see client_services.attach.
            attempt = validation.int_param(query.get("conn", [None])[-1], "conn", default=-1)
        except Malformed as exc:
            raise Malformed(exc.detail, code="malformed_query") from None
        return client_id, after, (attempt if attempt >= 0 else None)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            queue = _own_queue(receive)
            if queue is not None:
                # channels' AsyncConsumer.__call__, with a cheaper wait (_dispatch_all).
                self.scope = scope
                self.channel_layer = get_channel_layer(self.channel_layer_alias)
                self.base_send = send
                if self.channel_layer is None:
                    layer_receive = None
                else:
                    self.channel_name = await self.channel_layer.new_channel()
                    layer_receive = functools.partial(self.channel_layer.receive, self.channel_name)
                    self.channel_receive = layer_receive
                self._queue = queue
                with contextlib.suppress(StopConsumer):
                    await _dispatch_all(queue, layer_receive, self.dispatch)
            else:
                await super().__call__(scope, receive, send)
        finally:
            self._stop_taking_pokes()
            if self._holds_router:
                self._holds_router = False
                push.stop_router()
            self._unwatch_session()
            if self.attached:
                # The consumer died without a disconnect (its channel layer failed under it,
                # and daphne closes the socket with 1011): free the client all the same, or it
                # would count as connected, and never as stale, for good.
                self.attached = False
                with contextlib.suppress(Exception):
                    await self._detach_client()

    async def disconnect(self, code: int) -> None:
        metrics.closed(code)
        self._stop_taking_pokes()
        self._unwatch_session()
        if self._flushing is not None:
            self._flushing.cancel()
        if not self.attached:
            return
        self.attached = False
        try:
            await self._detach_client()
        finally:
            # Group memberships also expire by themselves (channels' group_expiry).
            for group in (client_group(self.client_id), user_group(self.user.pk)):
                with contextlib.suppress(Exception):
                    await self.channel_layer.group_discard(group, self.channel_name)

    def _stop_taking_pokes(self) -> None:
        if push.local_receivers.get(self.channel_name) == self.take_poke:
            del push.local_receivers[self.channel_name]

    def _watch_session(self) -> None:
        # Logout, a password change or deactivation close the socket (clients.sessions): at
        # once through the user's group, at the latest at this process's next re-check.
        key = getattr(self.scope.get("session"), "session_key", None) or ""
        self._session_digest = client_sessions.session_digest(key)
        self._watch = batching.of_this_loop(client_sessions.SessionWatch, _db)
        self._watch.add(self, (self.user.pk, key), self._session_revoked)

    def _unwatch_session(self) -> None:
        if self._watch is not None:
            self._watch.discard(self)

    def _session_revoked(self) -> None:
        event = {"type": "clients.revoked"}
        if self._queue is not None:
            self._queue.put_nowait(event)  # in turn with this consumer's handlers
        else:
            _background_task(self.clients_revoked(event))

    async def _close(self, code: int) -> None:
        self.closing = True
        await self.close(code=code)

    # -- frames from the tab ------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closing or not self.attached:
            return
        frame: Any = None
        try:
            if text_data is None:
                raise Malformed("binary frames are not supported; send JSON text", code="malformed")
            frame = parse_json(text_data)
            if not isinstance(frame, dict):
                raise Malformed("a frame is a JSON object", code="malformed")
            kind = frame.get("type")
            # Only a string names a handler (a list or object as "type" is not hashable).
            handler = self._handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise Malformed(f"unknown frame type {frame.get('type')!r}", code="unknown_type")
            await handler(self, frame)
        except ServiceError as exc:
            await self._send_error(exc.code, exc.detail, frame)
        except Exception as exc:
            # Never let one bad frame kill the socket (1011): the tab's outbox retries.
            await self._send_failure(exc, frame)

    async def _on_send(self, frame: dict) -> None:
        cmid, body = frame.get("client_msg_id"), frame.get("body", _MISSING)
        if body is _MISSING:
            validation.client_msg_id(cmid)
            raise Malformed("a send frame needs a body", code="invalid_body")
        request = services.send_request(self.user, self.client_id, cmid, frame.get("to"), body)
        # Stored in a batch with the other sockets' sends (messaging.sends).
        result = await batching.of_this_loop(sends.SendBatcher, _db).submit(request)
        await self._send_json(
            {
                "type": "sent",
                "client_msg_id": frame["client_msg_id"],
                "id": result.id,
                "duplicate": result.duplicate,
            }
        )

    async def _on_ack(self, frame: dict) -> None:
        # Not awaited: the socket goes on with its next frame and pokes while the ack joins a
        # batch. A failed write gets its error frame when it fails; a ping waits for the ack
        # before it (the pong finds the ack written).
        seq = validation.int_value(frame.get("seq"), "seq")
        self.last_ack = batching.of_this_loop(acks.AckBatcher, _db).submit(self.client_id, seq)
        self.last_ack.add_done_callback(self._ack_written)

    def _ack_written(self, future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is None:
            return
        if self.attached and not self.closing:
            _background_task(self._send_failure(future.exception()))

    async def _on_ping(self, frame: dict) -> None:
        # A ping is also a pull. Memberships are re-added first (a restarted Redis forgot
        # them, and no poke would reach this socket again), then anything whose poke was lost
        # goes out on this socket, so the pong's head finds the tab caught up. Each costs a
        # database read, so a socket's pings are bounded (messaging.throttle).
        allowed = self.throttle.allow_ping(asyncio.get_running_loop().time())
        if not allowed:
            if allowed is False:
                raise RateLimited("too many pings; one every few seconds is plenty", "rate_limited")
            return
        if self.last_ack is not None and not self.last_ack.done():
            await asyncio.wait([self.last_ack])
        try:
            await self._join_groups()
        except Exception as exc:
            logger.warning("channel layer unavailable for client %s: %r", self.client_id, exc)
        head = await self._flush()  # its last read also gives the head: no second query
        if head is not None:
            await self._send_json({"type": "pong", "head": head})

    async def _join_groups(self) -> None:
        await self.channel_layer.group_add(client_group(self.client_id), self.channel_name)
        await self.channel_layer.group_add(user_group(self.user.pk), self.channel_name)

    async def _on_typing(self, frame: dict) -> None:
        # Relayed to every socket of every other member: bounded per socket and room.
        room = frame.get("room")
        allowed = self.throttle.allow_typing(room, asyncio.get_running_loop().time())
        if not allowed:
            if allowed is False:
                raise RateLimited(
                    "too many typing frames; the excess is dropped, not relayed", "rate_limited"
                )
            return
        await self._typing(room)

    _handlers = {"send": _on_send, "ack": _on_ack, "ping": _on_ping, "typing": _on_typing}

    # -- channel-layer events -----------------------------------------------------------------

    async def take_poke(self, event: dict) -> bool:
        """
        A poke handed over directly by a push of this process (clients.push.local_receivers),
        handled here and now as messaging_poke would: the next delivery is sent, one already
        sent is dropped, one ahead of a gap is held (two sends committed close together can
        push in the opposite order). A poke that needs a database read (a gap with the hold
        full) starts a catch-up from the database. Before, it went through the channel layer:
        in a 2-process benchmark run 15,000 such pokes met channels-redis's full queue of
        the process and were dropped, and tabs that got nothing after them waited for their
        next ping (latency p99 32 s).
        """
        if asyncio.get_running_loop() is not self._loop or event.get("type") != "messaging.poke":
            return False
        seq = event.get("seq")
        if seq is None or (seq > self.sent_seq + 1 and len(self.held) >= HOLD_MAX):
            self._flush_soon()
            return True
        await self.messaging_poke(event)
        return True

    def _flush_soon(self) -> None:
        """
        Catch up from the database in a task of its own; one at a time (a request while one
        runs makes it read once more when it ends).
        """
        if self._flushing is not None and not self._flushing.done():
            self._flush_again = True
            return
        self._flushing = asyncio.get_running_loop().create_task(self._flush_until_done())

    async def _flush_until_done(self) -> None:
        while self.attached and not self.closing:
            self._flush_again = False
            try:
                await self._flush()
            except Exception as exc:
                # The database is away: the tab's next ping catches up.
                logger.warning("catch-up of client %s failed: %r", self.client_id, exc)
                return
            if not self._flush_again:
                return

    async def messaging_poke(self, event: dict) -> None:
        if not self.attached or self.closing:
            return
        seq = event.get("seq")
        if seq is not None and seq <= self.sent_seq:
            return  # already sent, by a flush that read it from the database
        if seq == self.sent_seq + 1:
            # The next delivery, committed, and carried by the poke itself: no database read.
            # sent_seq moves first: a poke taken directly while this send is awaited must see it.
            self.sent_seq = seq
            await self._send_delivery(seq, event["id"], event["tail"])
            while self.sent_seq + 1 in self.held:
                seq = self.sent_seq + 1
                message_id, tail = self.held.pop(seq)
                self.sent_seq = seq
                await self._send_delivery(seq, message_id, tail)
            return
        if seq is None or len(self.held) >= HOLD_MAX:
            await self._flush()
            return
        # A gap. Usually the poke before this one is a moment late (two sends committed close
        # together, and the second pushed first): hold this one briefly. If the gap is still
        # there then (that poke was lost, or came before this socket attached), the database
        # has every delivery, in order.
        self.held[seq] = (event["id"], event["tail"])
        loop = asyncio.get_running_loop()
        # A check already on its way is trusted for a second (a Redis restart can lose it).
        if loop.time() >= self.gap_check_until:
            self.gap_check_until = loop.time() + GAP_WAIT + 1.0
            loop.call_later(GAP_WAIT, self._check_gap_later)

    def _check_gap_later(self) -> None:
        if not (self.attached and not self.closing and self.held):
            self.gap_check_until = 0.0
            return  # filled meanwhile: nothing to check
        check = {"type": "messaging.gap"}
        if self._queue is not None:
            # In turn with this consumer's handlers, through its own queue (_dispatch_all
            # dispatches an event there like a frame of the socket).
            self._queue.put_nowait(check)
            return

        # Else through the channel layer, for the same reason.
        async def ask() -> None:
            try:
                await self.channel_layer.send(self.channel_name, check)
            except Exception:
                # A full channel or a layer that is down: try again a little later (the tab's
                # next ping also flushes); one retry at a time, and only while a gap remains.
                # (Every failed check used to start a retry of its own, without end: with
                # channels-redis's capacity per process reached, a chaos run's processes spent a
                # quarter of their time on them.)
                loop = asyncio.get_running_loop()
                self.gap_check_until = loop.time() + GAP_WAIT * 4 + 1.0
                loop.call_later(GAP_WAIT * 4, self._check_gap_later)

        _background_task(ask())

    async def messaging_gap(self, event: dict) -> None:
        self.gap_check_until = 0.0
        if self.attached and not self.closing and self.held:
            await self._flush()

    async def messaging_resync(self, event: dict) -> None:
        if self.attached and not self.closing:
            await self._send_resync()

    async def messaging_typing(self, event: dict) -> None:
        if self.attached and not self.closing:
            await self._send_json({"type": "typing", "room": event["room"], "user": event["user"]})

    async def messaging_presence(self, event: dict) -> None:
        if self.attached and not self.closing:
            await self._send_json(
                {"type": "presence", "user": event["user"], "online": event["online"]}
            )

    async def clients_kick(self, event: dict) -> None:
        # An operator disconnected this socket: 1012 (service restart) tells the tab to come back.
        # daphne's autobahn refuses 1012 from an application (the tab saw 1011): under daphne
        # the close frame goes through autobahn's close handshake directly.
        if self.attached and not self.closing:
            self.closing = True
            if not frames.close_with(self.base_send, CLOSE_KICKED):
                await self.close(code=CLOSE_KICKED)

    async def clients_supersede(self, event: dict) -> None:
        if self.attached and not self.closing:
            logger.info("client %s superseded by a newer socket", self.client_id)
            await self._close(CLOSE_SUPERSEDED)

    async def clients_deleted(self, event: dict) -> None:
        if self.attached and not self.closing:
            await self._close(CLOSE_EVICTED if event.get("evicted") else CLOSE_GONE)

    async def clients_logout(self, event: dict) -> None:
        # Sent to all of the user's sockets; only those opened with that session close.
        if self.attached and not self.closing and event.get("session") == self._session_digest:
            logger.info("client %s closed: its session logged out", self.client_id)
            await self._close(CLOSE_LOGGED_OUT)

    async def clients_reauth(self, event: dict) -> None:
        # The user's password or is_active may have changed: this process re-checks its
        # sockets' sessions now, in one batch.
        if self._watch is not None:
            self._watch.check_soon()

    async def clients_revoked(self, event: dict) -> None:
        if self.attached and not self.closing:
            logger.info("client %s closed: its session no longer logs in", self.client_id)
            await self._close(CLOSE_LOGGED_OUT)

    # -- sending ------------------------------------------------------------------------------

    async def _flush(self) -> int | None:
        """
        Send every delivery above the last seq sent, in order, reading in batches; returns the
        client's head as of the last read (None if the socket is closing).
        """
        batch = conf.get("MESSAGING_REPLAY_BATCH")
        while not self.closing:
            try:
                page = await self._pending(self.sent_seq, batch)
            except ServiceError:
                await self._close(CLOSE_GONE)
                return None
            for seq, message_id, tail in page.rows:
                if seq <= self.sent_seq:
                    continue  # sent meanwhile, by a poke taken while this page was read
                self.sent_seq = seq
                await self._send_delivery(seq, message_id, tail)
            if len(page.rows) < batch:
                self.held = {s: v for s, v in self.held.items() if s > self.sent_seq}
                return page.head
        return None

    async def _send_delivery(self, seq: int, message_id: int, tail: str) -> None:
        text = delivery_frame(seq, message_id, tail)
        metrics.delivered()
        if self._direct is None or not self._direct(text):
            await self.send(text_data=text)

    async def _send_json(self, payload: dict) -> None:
        await self.send(text_data=dumps(payload))

    async def _send_error(self, code: str, detail: str, frame: Any = None) -> None:
        payload = {"type": "error", "code": code, "detail": detail}
        cmid = frame.get("client_msg_id") if isinstance(frame, dict) else None
        if isinstance(cmid, str):
            # Echoed even when invalid (empty, too long): the tab's outbox can settle that send.
            payload["client_msg_id"] = cmid
        await self._send_json(payload)

    async def _send_failure(self, exc: BaseException | None, frame: Any = None) -> None:
        # A frame (or an ack's write) that failed on the server's side: `unavailable` while the
        # database is away, else `internal_error`; the tab retries either.
        if isinstance(exc, (OperationalError, InterfaceError)):
            logger.warning("database unavailable for client %s: %s", self.client_id, exc)
            await self._send_error("unavailable", "the database is unavailable; retry", frame)
        else:
            logger.error("unexpected error for client %s", self.client_id, exc_info=exc)
            await self._send_error("internal_error", "the server failed; retry", frame)

    async def _send_resync(self) -> None:
        metrics.resynced()
        await self._send_error(
            "resync_required",
            "your queue reached its limit and later messages were not queued; load history, "
            "then ack your head to resume",
        )

    # -- database ---------------------------------------------------------------------------

    @_db
    def _attach_client(
        self, client_id: uuid.UUID, attempt: int | None
    ) -> client_services.Attachment:
        return client_services.attach(self.user, client_id, self.channel_name, attempt)

    @_db
    def _detach_client(self) -> None:
        client_services.detach(self.client_id, self.channel_name)

    @_db
    def _pending(self, after: int, limit: int) -> services.Pending:
        return services.pending_for(self.client_id, after, limit)

    @_db
    def _online_peers(self) -> list[str]:
        return online_peers(self.user.pk)

    @_db
    def _typing(self, room: object) -> None:
        services.notify_typing(self.user, room)
