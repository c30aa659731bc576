"""The WebSocket delivery rules: fan-out per tab, gapless seq, ack, replay, dedup, supersede."""

import asyncio

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from clients.models import Client
from messaging import services
from messaging.models import Delivery, Message
from tests.conftest import connect_tab, http_as, new_client, refused_with

pytestmark = pytest.mark.django_db(transaction=True)


def send_frame(cmid: str, to: dict, body) -> dict:
    return {"type": "send", "client_msg_id": cmid, "to": to, "body": body}


@database_sync_to_async
def queue_of(client_id: str) -> list[int]:
    return list(
        Delivery.objects.filter(client_id=client_id).order_by("seq").values_list("seq", flat=True)
    )


@database_sync_to_async
def client_row(client_id: str) -> Client:
    return Client.objects.get(pk=client_id)


async def test_hello_first_with_client_id_and_head(alice):
    """The first frame is hello with the client id and its head."""
    cid = await new_client(alice)
    tab = await connect_tab(alice, cid)
    assert tab.hello == {"type": "hello", "client_id": cid, "head": 0}
    await tab.disconnect()


async def test_one_delivery_per_tab_of_recipient_and_of_sender(alice, bob):
    """A direct message reaches each of the recipient's tabs and each of the sender's, once."""
    a1, a2, b1, b2 = [await new_client(u) for u in (alice, alice, bob, bob)]
    tabs = {
        cid: await connect_tab(user, cid)
        for cid, user in ((a1, alice), (a2, alice), (b1, bob), (b2, bob))
    }
    await tabs[a1].send(send_frame("m1", {"user": "bob"}, {"text": "hi"}))
    sent = await tabs[a1].recv_type("sent")
    assert sent["client_msg_id"] == "m1" and sent["duplicate"] is False
    for cid, tab in tabs.items():
        (frame,) = await tab.deliveries(1)
        assert frame["seq"] == 1
        message = frame["message"]
        assert message["id"] == sent["id"]
        assert message["from"] == {"user": "alice", "client_id": a1}
        assert message["to"] == {"user": "bob"}
        assert message["body"] == {"text": "hi"}
        assert message["created"].endswith("Z")
        assert await tab.nothing(), f"tab {cid} got a second frame"
    for tab in tabs.values():
        await tab.disconnect()


async def test_seq_grows_by_one_per_client_without_gaps(alice, bob):
    """Each client's seqs are 1, 2, 3, ... whatever mix of senders and targets."""
    a1, b1 = await new_client(alice), await new_client(bob)
    ta, tb = await connect_tab(alice, a1), await connect_tab(bob, b1)
    for i in range(5):
        await ta.send(send_frame(f"a{i}", {"user": "bob"}, i))
        await tb.send(send_frame(f"b{i}", {"user": "alice"}, i))
    got_a = [f["seq"] for f in await ta.deliveries(10)]
    got_b = [f["seq"] for f in await tb.deliveries(10)]
    assert got_a == list(range(1, 11))
    assert got_b == list(range(1, 11))
    await ta.disconnect()
    await tb.disconnect()


async def test_ack_deletes_exactly_that_clients_deliveries_up_to_seq(alice, bob):
    """A cumulative ack deletes the acking client's deliveries <= seq and nobody else's."""
    a1, b1 = await new_client(alice), await new_client(bob)
    ta = await connect_tab(alice, a1)
    for i in range(4):
        await ta.send(send_frame(f"m{i}", {"user": "bob"}, i))
    await ta.deliveries(4)
    await ta.send({"type": "ack", "seq": 2})
    await ta.send({"type": "ping"})
    assert (await ta.recv_type("pong"))["head"] == 4
    assert await queue_of(a1) == [3, 4]
    assert await queue_of(b1) == [1, 2, 3, 4]
    await ta.send({"type": "ack", "seq": 99})  # above head: an ack of head
    await ta.send({"type": "ping"})
    await ta.recv_type("pong")
    assert await queue_of(a1) == []
    assert (await client_row(a1)).acked_seq == 4
    await ta.disconnect()


async def test_reconnect_with_after_replays_exactly_the_unacked_after_it(alice, bob):
    """A tab that reconnects with after=N gets the unacked deliveries above N, in order."""
    a1 = await new_client(alice)
    b1 = await new_client(bob)
    tb = await connect_tab(bob, b1)
    for i in range(6):
        await tb.send(send_frame(f"m{i}", {"user": "alice"}, {"n": i}))
        await tb.recv_type("sent")
    await tb.disconnect()
    ta = await connect_tab(alice, a1, after=2)
    frames = await ta.deliveries(4)
    assert [f["seq"] for f in frames] == [3, 4, 5, 6]
    assert [f["message"]["body"]["n"] for f in frames] == [2, 3, 4, 5]
    assert await ta.nothing()
    await ta.send({"type": "ack", "seq": 4})
    await ta.disconnect()
    ta = await connect_tab(alice, a1, after=4)
    assert [f["seq"] for f in await ta.deliveries(2)] == [5, 6]
    assert await ta.nothing()
    await ta.disconnect()


async def test_reconnect_after_zero_replays_everything_unacked(alice, bob):
    """after defaults to 0: everything still unacked comes again after a reload."""
    a1, b1 = await new_client(alice), await new_client(bob)
    tb = await connect_tab(bob, b1)
    for i in range(3):
        await tb.send(send_frame(f"m{i}", {"user": "alice"}, i))
        await tb.recv_type("sent")
    ta = await connect_tab(alice, a1)
    assert [f["seq"] for f in await ta.deliveries(3)] == [1, 2, 3]
    await ta.send({"type": "ack", "seq": 1})
    await ta.disconnect()
    ta = await connect_tab(alice, a1)
    assert [f["seq"] for f in await ta.deliveries(2)] == [2, 3]
    await ta.disconnect()
    await tb.disconnect()


async def test_retried_client_msg_id_stores_nothing_new(alice, bob):
    """A retry with the same client_msg_id is answered duplicate and queues nothing."""
    a1, b1 = await new_client(alice), await new_client(bob)
    ta = await connect_tab(alice, a1)
    await ta.send(send_frame("same", {"user": "bob"}, "x"))
    first = await ta.recv_type("sent")
    await ta.send(send_frame("same", {"user": "bob"}, "x"))
    second = await ta.recv_type("sent")
    assert first["duplicate"] is False and second["duplicate"] is True
    assert first["id"] == second["id"]
    assert await database_sync_to_async(Message.objects.count)() == 1
    assert await queue_of(b1) == [1]
    assert await queue_of(a1) == [1]
    await ta.disconnect()


async def test_dedup_across_websocket_and_http(alice, bob):
    """A message sent over HTTP and retried over the socket (and back) is stored once."""
    a1, b1 = await new_client(alice), await new_client(bob)
    http = await database_sync_to_async(http_as)(alice)
    from tests.conftest import api_post

    response = await database_sync_to_async(api_post)(
        http,
        "/api/messages/",
        {"client_id": a1, "client_msg_id": "x1", "to": {"user": "bob"}, "body": 1},
    )
    assert response.status_code == 201
    ta = await connect_tab(alice, a1)
    await ta.send(send_frame("x1", {"user": "bob"}, 1))
    sent = await ta.recv_type("sent")
    assert sent == {
        "type": "sent",
        "client_msg_id": "x1",
        "id": response.json()["id"],
        "duplicate": True,
    }
    await ta.send(send_frame("x2", {"user": "bob"}, 2))
    second = await ta.recv_type("sent")
    again = await database_sync_to_async(api_post)(
        http,
        "/api/messages/",
        {"client_id": a1, "client_msg_id": "x2", "to": {"user": "bob"}, "body": 2},
    )
    assert again.status_code == 200
    assert again.json() == {"id": second["id"], "duplicate": True}
    assert await queue_of(b1) == [1, 2]
    await ta.disconnect()


async def test_same_client_msg_id_from_two_clients_is_two_messages(alice, bob):
    """client_msg_id is unique per client, not globally."""
    a1, a2 = await new_client(alice), await new_client(alice)
    await new_client(bob)
    t1, t2 = await connect_tab(alice, a1), await connect_tab(alice, a2)
    await t1.send(send_frame("m", {"user": "bob"}, 1))
    await t2.send(send_frame("m", {"user": "bob"}, 2))
    s1, s2 = await t1.recv_type("sent"), await t2.recv_type("sent")
    assert not s1["duplicate"] and not s2["duplicate"] and s1["id"] != s2["id"]
    await t1.disconnect()
    await t2.disconnect()


async def test_second_connection_supersedes_first_with_4409(alice, bob):
    """A second socket for one client closes the first with 4409 and takes over delivery."""
    a1, b1 = await new_client(alice), await new_client(bob)
    old = await connect_tab(alice, a1)
    new = await connect_tab(alice, a1)
    assert await old.close_code() == 4409
    await old.disconnect()  # the late disconnect of the old socket must not detach the new one
    row = await client_row(a1)
    assert row.channel_name != ""
    tb = await connect_tab(bob, b1)
    await tb.send(send_frame("m", {"user": "alice"}, "after supersede"))
    (frame,) = await new.deliveries(1)
    assert frame["message"]["body"] == "after supersede"
    await new.disconnect()
    await tb.disconnect()
    assert (await client_row(a1)).channel_name == ""


async def test_a_stale_attempt_reaching_the_server_late_does_not_supersede(alice, bob):
    """A tab numbers its connection attempts (`conn`): an attempt it gave up on that reaches
    the server after its newer socket (a slow server, a proxy, a slow attach) is refused with
    4409, and the newer socket keeps the client and its deliveries; a newer attempt, or one
    without a number, still supersedes."""
    a1, b1 = await new_client(alice), await new_client(bob)
    live = await connect_tab(alice, a1, query="conn=5")
    assert await refused_with(alice, f"client_id={a1}&after=0&conn=4") == 4409
    assert await live.nothing(), "the newer socket was disturbed"
    assert (await client_row(a1)).last_attempt == 5
    tb = await connect_tab(bob, b1)
    await tb.send(send_frame("m", {"user": "alice"}, "to the newer socket"))
    (frame,) = await live.deliveries(1)
    assert frame["message"]["body"] == "to the newer socket"
    again = await connect_tab(alice, a1, after=1, query="conn=5")  # the same number: a retry
    assert await live.close_code() == 4409
    await live.disconnect()
    newer = await connect_tab(alice, a1, after=1, query="conn=6")
    assert await again.close_code() == 4409
    await again.disconnect()
    unnumbered = await connect_tab(alice, a1, after=1)
    assert await newer.close_code() == 4409
    await newer.disconnect()
    await unnumbered.disconnect()
    await tb.disconnect()
    assert (await client_row(a1)).channel_name == ""


async def test_deleting_a_connected_client_closes_it_with_4404(alice):
    """DELETE /api/clients/{id}/ closes that client's open socket with 4404 and drops its queue."""
    a1 = await new_client(alice)
    tab = await connect_tab(alice, a1)
    http = await database_sync_to_async(http_as)(alice)
    response = await database_sync_to_async(http.delete)(f"/api/clients/{a1}/")
    assert response.status_code == 204
    assert await tab.close_code() == 4404
    await tab.disconnect()
    assert not await database_sync_to_async(Client.objects.filter(pk=a1).exists)()


async def test_ping_answers_pong_with_head(alice, bob):
    """ping is answered with pong and the client's head, so a tab notices a lost push."""
    a1, b1 = await new_client(alice), await new_client(bob)
    tb = await connect_tab(bob, b1)
    await tb.send(send_frame("m", {"user": "alice"}, 1))
    await tb.recv_type("sent")
    ta = await connect_tab(alice, a1, after=1)  # claims to have seen seq 1 already
    await ta.send({"type": "ping"})
    assert await ta.recv() == {"type": "pong", "head": 1}
    await ta.disconnect()
    await tb.disconnect()


async def test_a_ping_pulls_deliveries_whose_poke_was_lost(alice, bob, monkeypatch):
    """A ping sends on the socket what a lost poke left queued, before its pong."""
    a1, b1 = await new_client(alice), await new_client(bob)
    ta = await connect_tab(alice, a1)
    tb = await connect_tab(bob, b1)
    monkeypatch.setattr(services, "channel_send_after_commit", lambda events: None)
    await tb.send(send_frame("lost-poke", {"user": "alice"}, "hi"))
    await tb.recv_type("sent")
    await ta.send({"type": "ping"})
    delivery = await ta.recv()
    assert delivery["type"] == "delivery" and delivery["seq"] == 1
    assert delivery["message"]["body"] == "hi"
    assert await ta.recv() == {"type": "pong", "head": 1}
    await ta.disconnect()
    await tb.disconnect()


async def forget_all_groups(layer) -> None:
    # What a restarted Redis holds afterwards: no group memberships at all.
    if hasattr(layer, "groups"):  # the in-memory layer
        layer.groups.clear()
        return
    for index in range(layer.ring_size):
        async with layer.connection(index) as conn:
            keys = await conn.keys(layer.prefix + ":group:*")
            if keys:
                await conn.delete(*keys)


async def test_a_ping_rejoins_groups_a_restarted_channel_layer_forgot(alice, bob):
    """After the channel layer lost every group (a Redis restart), a tab's next ping makes
    live pushes reach it again."""
    a1, b1 = await new_client(alice), await new_client(bob)
    ta = await connect_tab(alice, a1)
    tb = await connect_tab(bob, b1)
    await forget_all_groups(get_channel_layer())
    await ta.send({"type": "ping"})
    assert await ta.recv() == {"type": "pong", "head": 0}
    await tb.send(send_frame("after-restart", {"user": "alice"}, "back"))
    delivery = await ta.recv()
    assert delivery["type"] == "delivery" and delivery["message"]["body"] == "back"
    await ta.disconnect()
    await tb.disconnect()


def record_layer_sends(monkeypatch) -> list[str]:
    """
    The types of the events sent through the channel layer from now on (still sent).
    """
    layer = get_channel_layer()
    sent: list[str] = []
    real_send = type(layer).send

    async def recording_send(self, channel, message):
        sent.append(message["type"])
        await real_send(self, channel, message)

    monkeypatch.setattr(type(layer), "send", recording_send)
    return sent


async def test_pokes_to_sockets_of_this_process_skip_the_channel_layer(alice, bob, monkeypatch):
    """A delivery to a socket of the sending process is handed to it directly (no channel-layer
    message per tab), in order; a socket of another process (here: a channel without a local
    socket) is still poked through the layer."""
    a1, b1 = await new_client(alice), await new_client(bob)
    ta, tb = await connect_tab(alice, a1), await connect_tab(bob, b1)
    layer = get_channel_layer()
    through_layer = record_layer_sends(monkeypatch)
    for i in range(5):
        await ta.send(send_frame(f"m{i}", {"user": "bob"}, i))
    assert [f["seq"] for f in await tb.deliveries(5)] == [1, 2, 3, 4, 5]
    assert [f["seq"] for f in await ta.deliveries(5)] == [1, 2, 3, 4, 5]
    assert "messaging.poke" not in through_layer

    # Bob's client now belongs to a socket elsewhere: its pokes go through the layer.
    await tb.disconnect()
    elsewhere = await layer.new_channel()
    await database_sync_to_async(Client.objects.filter(pk=b1).update)(channel_name=elsewhere)
    await ta.send(send_frame("m9", {"user": "bob"}, 9))
    assert (await ta.deliveries(1))[0]["seq"] == 6
    poke = await layer.receive(elsewhere)
    assert (poke["type"], poke["seq"]) == ("messaging.poke", 6)
    assert through_layer.count("messaging.poke") == 1
    await ta.disconnect()


async def test_a_local_poke_that_needs_a_read_catches_up_without_the_channel_layer(
    alice, bob, monkeypatch
):
    """A poke for a socket of this process that arrives with its hold full (a gap that waited
    too long) starts a catch-up from the database at once; it never goes through the channel
    layer, whose queue may be full (channels-redis refuses then, and the tab would wait for its
    next ping)."""
    from clients import push
    from messaging import consumers

    a1, b1 = await new_client(alice), await new_client(bob)
    ta, tb = await connect_tab(alice, a1), await connect_tab(bob, b1)
    monkeypatch.setattr(services, "channel_send_after_commit", lambda events: None)
    for i in range(3):  # stored, no pokes: the socket knows nothing of them yet
        await tb.send(send_frame(f"m{i}", {"user": "alice"}, i))
        await tb.recv_type("sent")
    through_layer = record_layer_sends(monkeypatch)
    monkeypatch.setattr(consumers, "HOLD_MAX", 0)  # the hold is full at once
    channel = await database_sync_to_async(
        lambda: Client.objects.values_list("channel_name", flat=True).get(pk=a1)
    )()
    take = push.local_receivers[channel]
    assert await take({"type": "messaging.poke", "seq": 3, "id": 0, "tail": "{}"}) is True
    frames = await ta.deliveries(3)
    assert [(f["seq"], f["message"]["body"]) for f in frames] == [(1, 0), (2, 1), (3, 2)]
    assert through_layer == []
    await ta.disconnect()
    await tb.disconnect()


async def test_the_consumer_takes_layer_messages_one_at_a_time_between_socket_frames():
    """The consumer's wait (consumers._dispatch_all): socket frames and channel-layer messages are
    dispatched one at a time; the next layer message is received only once the previous one is
    dispatched (a busy consumer leaves them in the layer); a failing layer ends the consumer."""
    from channels.exceptions import StopConsumer

    from messaging.consumers import _dispatch_all

    queue: asyncio.Queue = asyncio.Queue()
    layer: asyncio.Queue = asyncio.Queue()
    received, dispatched = [], []
    first_done = asyncio.Event()

    async def layer_receive():
        message = await layer.get()
        if isinstance(message, Exception):
            raise message
        received.append(message["n"])
        return message

    async def dispatch(message):
        if message["n"] == 1:
            await first_done.wait()
        dispatched.append(message["n"])
        if message["n"] == "stop":
            raise StopConsumer

    for n in (1, 2, 3):
        layer.put_nowait({"type": "x", "n": n})
    task = asyncio.create_task(_dispatch_all(queue, layer_receive, dispatch))
    await asyncio.sleep(0.05)
    assert received == [1]  # 2 and 3 wait in the layer while 1 is being dispatched
    queue.put_nowait({"type": "websocket.receive", "n": 0})
    first_done.set()
    await asyncio.sleep(0.05)
    assert dispatched == [1, 0, 2, 3]
    queue.put_nowait({"type": "websocket.receive", "n": "stop"})
    with pytest.raises(StopConsumer):
        await task

    layer.put_nowait(ConnectionError("Redis went away"))
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(_dispatch_all(asyncio.Queue(), layer_receive, dispatch), 2)

    async def cancelled_inside():
        raise asyncio.CancelledError  # a layer's receive cancelled by something of its own

    with pytest.raises(RuntimeError, match="channel layer receive ended"):
        await asyncio.wait_for(_dispatch_all(asyncio.Queue(), cancelled_inside, dispatch), 2)
