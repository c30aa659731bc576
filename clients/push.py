"""
Real-time notifications through the channel layer, sent only after the transaction commits.

Real time is a bonus: the database is the source of truth, so a lost or failed push costs latency
(the tab finds the delivery on its next read), never a message.
"""

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable

from asgiref.sync import SyncToAsync, async_to_sync
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer
from django.db import transaction

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


async def _group_send_all(layer, events: list[GroupEvent]) -> None:
    for group, event in events:
        await layer.group_send(group, event)


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


# How long a database thread waits for its pushes before it gives up waiting (they still run).
PUSH_WAIT = 10.0


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
        future = asyncio.run_coroutine_threadsafe(send_all(layer, events), loop)
        deadline = time.monotonic() + PUSH_WAIT
        while True:
            try:
                future.result(timeout=0.25)
                return
            except concurrent.futures.TimeoutError:
                if not loop.is_running() or time.monotonic() > deadline:
                    logger.warning("not waiting longer for %d push(es)", len(events))
                    return
    except Exception as exc:
        # Expected while Redis restarts; a traceback would add nothing.
        logger.warning("channel layer push of %d event(s) failed: %r", len(events), exc)


# Direct hand-overs between two returns to the event loop. Frames written to a socket leave only
# when the loop next polls: without these returns the first of 1,000 tabs got its frame after
# the last one's was built (40 ms), while the load of reading them waited.
TAKES_PER_TURN = 16


async def _channel_send_all(layer, events: list[tuple[str, dict]]) -> None:
    taken = 0
    for channel, event in events:
        take = local_receivers.get(channel)
        if take is not None:
            try:
                if await take(event):
                    taken += 1
                    if taken % TAKES_PER_TURN == 0:
                        await asyncio.sleep(0)
                    continue
            except Exception:
                logger.exception("a socket of this process failed to take an event directly")
        try:
            await layer.send(channel, event)
        except ChannelFull:
            logger.info("channel %s is full; its consumer reads the database when it can", channel)
