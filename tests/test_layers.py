"""The project's in-memory channel layer: what Channels' own does, without its overheads."""

import asyncio

import pytest
from channels.exceptions import ChannelFull

from messaging.layers import InMemoryChannelLayer


async def test_messages_arrive_in_order_and_as_copies():
    layer = InMemoryChannelLayer()
    name = await layer.new_channel()
    sent = [{"type": "t", "n": n} for n in range(3)]
    for message in sent:
        await layer.send(name, message)
    sent[0]["n"] = 99  # a sender changing its dict afterwards changes nothing received
    assert [(await layer.receive(name))["n"] for _ in range(3)] == [0, 1, 2]


async def test_a_full_channel_refuses():
    layer = InMemoryChannelLayer(capacity=2)
    name = await layer.new_channel()
    await layer.send(name, {"type": "t"})
    await layer.send(name, {"type": "t"})
    with pytest.raises(ChannelFull):
        await layer.send(name, {"type": "t"})


async def test_the_sweep_drops_idle_empty_queues_but_not_a_waiting_receivers():
    """A closed socket's empty queue goes at the next sweep; a socket waiting for its next
    message keeps its queue and still gets what is sent after the sweep."""
    layer = InMemoryChannelLayer()
    layer.sweep_interval = 0.0
    gone, waiting = await layer.new_channel(), await layer.new_channel()
    await layer.send(gone, {"type": "t"})
    await layer.receive(gone)  # read, then its consumer went away
    receiver = asyncio.create_task(layer.receive(waiting))
    await asyncio.sleep(0)
    layer._clean_expired()
    assert gone not in layer.channels
    assert waiting in layer.channels
    await layer.send(waiting, {"type": "t", "n": 1})
    assert (await asyncio.wait_for(receiver, 1))["n"] == 1


async def test_a_receiver_gets_one_queue_for_its_life():
    """No new queue per message (each one cost an asyncio.Queue and its Event)."""
    layer = InMemoryChannelLayer()
    name = await layer.new_channel()
    await layer.send(name, {"type": "t"})
    first = layer.channels[name]
    await layer.receive(name)
    await layer.send(name, {"type": "t"})
    await layer.receive(name)
    assert layer.channels[name] is first


async def test_the_redis_layer_pool_allows_many_busy_sockets():
    """redis-py 8 caps a pool at 100 connections and then fails at once: more than 100 sockets
    of one process doing layer work at the same moment must not make pushes fail."""
    import os

    from channels.layers import get_channel_layer

    if not os.environ.get("REDIS_URL"):
        pytest.skip("the channels-redis half of the suite")
    layer = get_channel_layer()
    assert layer.hosts[0]["max_connections"] == 1000
    channel = await layer.new_channel()
    # 300 concurrent sends and group joins through one process's pool.
    await asyncio.gather(
        *(layer.send(channel, {"type": "t", "n": i}) for i in range(150)),
        *(layer.group_add(f"g{i}", channel) for i in range(150)),
    )
    got = [await layer.receive(channel) for _ in range(150)]
    assert sorted(m["n"] for m in got) == list(range(150))
    await layer.flush()
