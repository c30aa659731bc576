"""
Real-time notifications through the channel layer, sent only after the transaction commits.

Real time is a bonus: the database is the source of truth, so a lost or failed push costs latency
(the tab finds the delivery on its next read), never a message.
"""

import asyncio
import collections
import contextlib
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from asgiref.sync import SyncToAsync, async_to_sync
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer
from django.db import transaction

from messaging import metrics

logger = logging.getLogger(__name__)

GroupEvent = tuple[str, dict]

# Sockets of this process, by channel name: an event for one of them is offered to it directly
# (its receiver answers True if it took it) before it goes through the channel layer. A message
# to a 1,000-tab room is then one call per socket, not a channel-layer message, a wake-up of
# the socket's task and channels' dispatch each (see DeliveryConsumer.take_poke).
local_receivers: dict[str, Callable[[dict], Awaitable[bool]]] = {}


def group_send_after_commit(events: Iterable[GroupEvent]) -> None:
    """
    Send each (group, event) once the current transaction commits (at once outside one).
    """
    batch = list(events)
    if batch:
        transaction.on_commit(lambda: group_send_now(batch))


def group_send_now(events: list[GroupEvent]) -> None:
    """
    Send each (group, event) now, from synchronous code; failures are logged, never raised.
    """
    _push(_group_send_all, events)


async def _group_send_all(layer, events: list[GroupEvent], background: Any = None) -> None:
    if background is not None:
        background.add_layer_send(_group_send_all(layer, events))
        return
    for group, event in events:
        try:
            await layer.group_send(group, event)
        except Exception as exc:
            logger.warning("channel layer push to %s failed: %r", group, exc)


def channel_send_after_commit(events: Iterable[tuple[str, dict]]) -> None:
    """
    Send each (channel name, event) once the current transaction commits (at once outside one).
    """
    batch = list(events)
    if batch:
        transaction.on_commit(lambda: channel_send_now(batch))


def channel_send_now(events: list[tuple[str, dict]]) -> None:
    """
    Send each (channel name, event) now; a full channel (a consumer that stopped reading) is
    skipped, other failures are logged, never raised.
    """
    _push(_channel_send_all, events)


class _Pushes:
    """
    The pushes handed to one event loop, run one at a time in order: their hand-overs to this
    process's sockets at once, what goes through the channel layer queued in `layer_sends`, run
    in order by a task of its own, so a slow or unreachable Redis does not hold up the sockets
    of this process.
    """

    def __init__(self) -> None:
        self.queue: collections.deque = collections.deque()
        self.task: asyncio.Task | None = None
        self.layer_sends: collections.deque = collections.deque()
        self.layer_task: asyncio.Task | None = None
        self.backlog = 0  # events in `queue`, not yet handed over or passed to `layer_sends`
        self.waiters: list[asyncio.Future] = []  # see caught_up()

    def add(self, item: tuple) -> None:
        self.queue.append(item)
        self.backlog += len(item[2])
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    def add_layer_send(self, coro: Any) -> None:
        self.layer_sends.append(coro)
        if self.layer_task is None:
            self.layer_task = asyncio.get_running_loop().create_task(self._run_layer_sends())

    async def _run(self) -> None:
        try:
            while self.queue:
                send_all, layer, events, since = self.queue.popleft()
                try:
                    await send_all(layer, events, background=self)
                except Exception as exc:
                    logger.warning("channel layer push of %d event(s) failed: %r", len(events), exc)
                finally:
                    metrics.pushed(since)
                    self.backlog -= len(events)
                    if self.backlog <= BACKLOG_MAX:
                        self._wake()
        finally:
            self.task = None
            self._wake()

    def _wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def _run_layer_sends(self) -> None:
        try:
            while self.layer_sends:
                await self.layer_sends.popleft()  # each catches and logs its own failures
        finally:
            self.layer_task = None


_pushes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pushes]" = (
    weakref.WeakKeyDictionary()
)


# Pokes this process may have waiting for its sockets before new sends wait (caught_up): about a
# second of pushing at 200 tabs. Without a bound, sends were stored at 330 a second while the
# sockets got 60 a second, and the backlog (and its memory) grew for as long as the load lasted.
BACKLOG_MAX = 10_000
BACKLOG_WAIT_MAX = 1.0  # seconds; a push stuck on a slow channel layer must not stop every send


async def caught_up() -> None:
    """
    Wait while this event loop's pushes have more than BACKLOG_MAX events to hand over (at most
    BACKLOG_WAIT_MAX): a process stores new messages only as fast as its sockets get them.
    """
    loop = asyncio.get_running_loop()
    pushes = _pushes.get(loop)
    if pushes is None or pushes.backlog <= BACKLOG_MAX:
        return
    future = loop.create_future()
    pushes.waiters.append(future)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(future, BACKLOG_WAIT_MAX)


def handing_over() -> bool:
    """
    Whether this event loop's pushes have pokes left to hand over.
    """
    pushes = _pushes.get(asyncio.get_running_loop())
    return pushes is not None and pushes.backlog > 0


def _enqueue(loop: asyncio.AbstractEventLoop, item: tuple) -> None:
    # Runs in the loop's thread.
    pushes = _pushes.get(loop)
    if pushes is None:
        pushes = _pushes[loop] = _Pushes()
    pushes.add(item)


def _push(send_all, events: list[tuple[str, dict]]) -> None:
    layer = get_channel_layer()
    if layer is None or not events:
        return
    try:
        loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
        if (
            loop is None
            or loop.is_closed()  # left behind by an earlier call on this thread
            or getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None) != os.getpid()
        ):
            async_to_sync(send_all)(layer, events)  # no server loop: a command, a plain thread
            return
        # A thread of the server's event loop (a view or a consumer's database call). Not
        # async_to_sync: once the loop stops (SIGTERM while sockets close) it would wait forever
        # for a coroutine that never runs, and hold the process's exit with it.
        if not loop.is_running():
            logger.info("event loop stopped: %d push(es) skipped", len(events))
            return
        # Not waited for: the database thread goes on with its next call (waiting held a pool
        # thread per send for the pushes' Redis round trips and for the busy loop to get to
        # them). The loop runs them one after the other, in the order they were handed over, so
        # the pokes of two sends do not interleave (a tab would see a gap, then its filling).
        loop.call_soon_threadsafe(_enqueue, loop, (send_all, layer, events, time.monotonic()))
    except Exception as exc:
        # Expected while Redis restarts; a traceback would add nothing.
        logger.warning("channel layer push of %d event(s) failed: %r", len(events), exc)


# How long direct hand-overs run before the event loop gets a turn (to read other sockets). Under
# daphne a socket writes its frame at once (messaging.frames); a turn after every 16 hand-overs,
# as before, let the loop read the previous message's 1,000 acks in the middle of the next
# fan-out (p99 to 1,000 tabs 128 ms, 105-110 ms with no turns; 2026-12-01). Frames sent the ASGI
# way (MESSAGING_DIRECT_FRAMES off) leave only at a turn: then one every TAKES_PER_TURN (without
# them the first of 1,000 tabs got its frame after the last one's was built).
TURN_SECONDS = 0.02
TAKES_PER_TURN = 16
POKE = "messaging.poke"  # the event that goes to other processes in batches
ROUTER = "pokes"  # the name, after the process's prefix, of its channel of batched events


async def _channel_send_all(layer, events: list[tuple[str, dict]], background: Any = None) -> None:
    turn = _Turn()
    singles: list[tuple[str, dict]] = []
    # channels-redis names a socket's channel "specific.<process prefix>!<id>": the pokes of one
    # send for the sockets of another process go to that process in one message (one Redis
    # round trip, not one per tab; the message text once, not once per tab), where its router
    # hands them over.
    batches: dict[tuple[str, object], list[tuple[str, dict]]] = {}
    can_batch = getattr(layer, "client_prefix", None) is not None
    for channel, event in events:
        take = local_receivers.get(channel)
        if take is not None:
            if await _offer(take, event, turn):
                continue
        elif can_batch and event.get("type") == POKE and "!" in channel:
            key = (channel[: channel.index("!") + 1], event["id"])
            batches.setdefault(key, []).append((channel, event))
            continue
        singles.append((channel, event))
    out = singles
    for (process, message_id), pokes in batches.items():
        if len(pokes) == 1:
            out.append(pokes[0])
            continue
        batch = {
            "type": "pokes",
            "id": message_id,
            "tail": pokes[0][1]["tail"],
            "items": [(channel, event["seq"]) for channel, event in pokes],
        }
        out.append((process + ROUTER, batch))
    if out:
        if background is not None:
            background.add_layer_send(_send_each(layer, out))
        else:
            await _send_each(layer, out)


class _Turn:
    """
    The end of the current run of hand-overs (TURN_SECONDS from its start).
    """

    __slots__ = ("ends", "takes", "takes_per_turn")

    def __init__(self) -> None:
        from messaging import conf

        self.ends = time.monotonic() + TURN_SECONDS
        self.takes = 0
        self.takes_per_turn = 0 if conf.get("MESSAGING_DIRECT_FRAMES") else TAKES_PER_TURN

    def over(self) -> bool:
        self.takes += 1
        if self.takes_per_turn and self.takes % self.takes_per_turn == 0:
            return True
        return time.monotonic() >= self.ends


async def _offer(take: Callable[[dict], Awaitable[bool]], event: dict, turn: _Turn) -> bool:
    """
    Hand an event to a socket of this process; True if it took it. Once the `turn` is over,
    back to the event loop first.
    """
    try:
        if not await take(event):
            return False
    except Exception:
        logger.exception("a socket of this process failed to take an event directly")
        return False
    if turn.over():
        await asyncio.sleep(0)
        turn.ends = time.monotonic() + TURN_SECONDS
    return True


async def _send_each(layer, events: list[tuple[str, dict]]) -> None:
    for channel, event in events:
        try:
            await layer.send(channel, event)
        except ChannelFull:
            logger.info("channel %s is full; its consumer reads the database when it can", channel)
        except Exception as exc:
            # Redis away: the deliveries wait in the database (the tab's next ping reads them).
            logger.warning("channel layer push to %s failed: %r", channel, exc)


class _Router:
    """
    This event loop's receiver of batched events (channels-redis only), owned by the loop's
    sockets: the first one starts it and the last one to end stops it, so a loop without
    sockets (a test's, or a server's at shutdown) has no task left waiting on Redis.
    """

    def __init__(self) -> None:
        self.sockets = 0
        self.task: asyncio.Task | None = None

    def acquire(self, layer: Any, name: str) -> None:
        self.sockets += 1
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(_route(layer, name))

    def release(self) -> None:
        self.sockets = max(0, self.sockets - 1)
        if self.sockets == 0 and self.task is not None:
            self.task.cancel()
            self.task = None


_routers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Router]" = (
    weakref.WeakKeyDictionary()
)


def start_router() -> bool:
    """
    Count a socket of this event loop as an owner of the loop's router of batched events, and
    start the router if it is not running; True if the socket must call `stop_router` when it
    ends. Called before any event can be addressed to the socket.
    """
    layer = get_channel_layer()
    prefix = getattr(layer, "client_prefix", None)
    if layer is None or prefix is None:
        return False
    loop = asyncio.get_running_loop()
    router = _routers.get(loop)
    if router is None:
        router = _routers[loop] = _Router()
    router.acquire(layer, f"specific.{prefix}!{ROUTER}")
    return True


def stop_router() -> None:
    """
    A socket that started the router ended: the last one of the loop stops it.
    """
    router = _routers.get(asyncio.get_running_loop())
    if router is not None:
        router.release()


def router_running() -> bool:
    """
    Whether this event loop's router of batched events is running (for tests and checks).
    """
    router = _routers.get(asyncio.get_running_loop())
    return router is not None and router.task is not None and not router.task.done()


async def _route(layer, name: str) -> None:
    while True:
        try:
            message = await layer.receive(name)
        except Exception as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A cancellation that a library under the receive turned into an error (a
                # timeout, a connection error): it still ends the router.
                raise asyncio.CancelledError from exc
            # Redis away: the sockets' own receives fail too and their tabs reconnect.
            logger.warning("batched events of this process unavailable: %r", exc)
            await asyncio.sleep(1.0)
            continue
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cancelled while a message came in, and the receive returned it all the same.
            raise asyncio.CancelledError
        turn = _Turn()
        for channel, seq in message.get("items", ()):
            event = {"type": POKE, "seq": seq, "id": message["id"], "tail": message["tail"]}
            take = local_receivers.get(channel)
            if take is not None and await _offer(take, event, turn):
                continue
            # A gap that needs a read, or a socket that went away: its own channel, in turn
            # with its other events.
            await _send_each(layer, [(channel, event)])
