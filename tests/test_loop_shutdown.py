"""
Every long-lived task has an owner that stops it: an event loop whose sockets have ended closes,
with channels-redis too (a task that does not end when cancelled hangs asyncio.run, pytest's
loop teardown and a server's shutdown).
"""

import asyncio
import os
import random
import threading

import pytest
from channels.layers import get_channel_layer

from clients import push
from tests.conftest import connect_tab, new_client

pytestmark = [pytest.mark.backends, pytest.mark.django_db(transaction=True)]


def _redis_only() -> None:
    if not os.environ.get("REDIS_URL"):
        pytest.skip("the channels-redis half of the suite (REDIS_URL unset)")


def _run_in_new_loop(coro_fn, seconds: float) -> bool:
    """
    Run `coro_fn()` with asyncio.run in a thread of its own; True if the loop finished and
    closed within `seconds` (a loop stuck at its end is left behind in a daemon thread).
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(coro_fn())
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if errors:
        raise errors[0]
    return not thread.is_alive()


async def test_a_cancelled_redis_receive_ends():
    """A layer receive cancelled at any moment (while connecting, sending, or waiting on the
    blocking pop) ends at once, in a loop of its own each time, as the server's and the tests'
    loops come and go."""
    _redis_only()
    layer = get_channel_layer()
    stuck = []
    for attempt in range(30):
        delay = random.choice([0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05])

        async def receive_then_cancel(delay=delay):
            name = await layer.new_channel()
            receiving = asyncio.get_running_loop().create_task(layer.receive(name))
            await asyncio.sleep(delay)
            receiving.cancel()
            done, _ = await asyncio.wait({receiving}, timeout=3)
            assert done, "the cancelled receive is still running"
            await layer.close_pools()

        if not await asyncio.to_thread(_run_in_new_loop, receive_then_cancel, 10):
            stuck.append((attempt, delay))
    assert not stuck, f"cancelled receives that did not end (attempt, delay): {stuck}"


async def test_the_router_runs_while_the_loop_has_sockets(alice):
    """The process's router of batched pokes starts with the first socket and stops with the
    last one."""
    _redis_only()
    first = await connect_tab(alice, await new_client(alice))
    second = await connect_tab(alice, await new_client(alice))
    assert push.router_running()
    await first.disconnect()
    assert push.router_running()
    await second.disconnect()
    await asyncio.sleep(0)
    assert not push.router_running()


def test_a_loop_with_a_router_closes():
    """A loop in which sockets started the router closes promptly once they have ended."""
    _redis_only()

    async def sockets_come_and_go():
        for _ in range(3):
            assert push.start_router()
            assert push.start_router()
            await asyncio.sleep(0.05)  # the router is inside its blocking pop by now
            push.stop_router()
            push.stop_router()
            assert not push.router_running()
        await get_channel_layer().close_pools()

    for _ in range(5):
        assert _run_in_new_loop(sockets_come_and_go, 10), "the loop did not close"

