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
    router = push._routers[asyncio.get_running_loop()].task
    assert router is not None
    await first.disconnect()
    assert push.router_running()
    await second.disconnect()
    done, _ = await asyncio.wait({router}, timeout=2)
    assert done, "the router task did not end with the last socket"
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



async def test_layer_calls_give_up_on_a_redis_that_does_not_answer():
    """With no read timeout on the layer's connections, a Redis that accepts connections and
    never answers must not hold a socket's group join or a push for good: each call gives up
    after the layer's op_timeout."""
    import socket
    import time

    from messaging.layers import RedisChannelLayer

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        layer = RedisChannelLayer(
            hosts=[{"address": f"redis://127.0.0.1:{silent.getsockname()[1]}/0"}],
            op_timeout=0.5,
        )
        for call in (
            lambda: layer.group_add("g", "specific.x!y"),
            lambda: layer.send("specific.x!y", {"type": "t"}),
            lambda: layer.group_send("g", {"type": "t"}),
        ):
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await call()
            assert time.monotonic() - started < 2
    finally:
        silent.close()
