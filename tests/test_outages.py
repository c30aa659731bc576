"""
A database or channel layer that fails for a moment: clear "retry" answers, sockets that stay
usable or close with a retry code, and nothing stored half-way or left marked as connected.
"""

import asyncio
import collections

import psycopg
import pytest
from channels.db import database_sync_to_async
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer
from django.db import OperationalError
from psycopg_pool import PoolTimeout

from clients import services as client_services
from clients.models import Client
from messaging import batching, consumers, sends, services
from messaging.models import Delivery, Message
from tests.conftest import api_post, connect_tab, http_as, new_client, refused_with

pytestmark = pytest.mark.django_db(transaction=True)


def database_down(*args, **kwargs):
    raise OperationalError("server closed the connection unexpectedly")


async def test_http_answers_503_unavailable_when_the_database_fails(alice, monkeypatch):
    """A send while the database is unreachable is a JSON 503 with Retry-After, not a 500."""
    a1 = await new_client(alice)
    monkeypatch.setattr(services, "send_message", database_down)
    http = await database_sync_to_async(http_as)(alice)
    response = await database_sync_to_async(api_post)(
        http,
        "/api/messages/",
        {"client_id": a1, "client_msg_id": "m1", "to": {"user": "alice"}, "body": 1},
    )
    assert response.status_code == 503
    assert response["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "unavailable"


async def test_a_send_frame_gets_unavailable_and_the_socket_stays_usable(alice, monkeypatch):
    """A send that meets a failed database is answered `unavailable` (the outbox retries);
    the same send afterwards is stored once."""
    a1 = await new_client(alice)
    tab = await connect_tab(alice, a1)
    real = services.send_many
    monkeypatch.setattr(services, "send_many", database_down)
    frame = {"type": "send", "client_msg_id": "m1", "to": {"user": "alice"}, "body": "x"}
    await tab.send(frame)
    error = await tab.recv_type("error")
    assert (error["code"], error["client_msg_id"]) == ("unavailable", "m1")
    monkeypatch.setattr(services, "send_many", real)
    await tab.send(frame)
    assert (await tab.recv_type("sent"))["duplicate"] is False
    assert await database_sync_to_async(Message.objects.count)() == 1
    await tab.disconnect()


async def test_an_ack_that_cannot_be_written_gets_unavailable_and_a_later_ack_lands(
    alice, monkeypatch
):
    """Acks are written in batches while the socket goes on: a batch that fails twice gets each
    of its sockets an `unavailable` frame, the socket stays usable, and the next ack lands."""
    a1 = await new_client(alice)
    tab = await connect_tab(alice, a1)
    frame = {"type": "send", "client_msg_id": "m1", "to": {"user": "alice"}, "body": "x"}
    await tab.send(frame)
    assert (await tab.recv_type("delivery"))["seq"] == 1
    calls = []

    def ack_down(acks):
        calls.append(dict(acks))
        raise OperationalError("server closed the connection unexpectedly")

    real = services.ack_many
    monkeypatch.setattr(services, "ack_many", ack_down)
    await tab.send({"type": "ack", "seq": 1})
    error = await tab.recv_type("error")
    assert error["code"] == "unavailable"
    assert len(calls) == 2  # written once more before giving up
    assert await database_sync_to_async(Delivery.objects.count)() == 1
    monkeypatch.setattr(services, "ack_many", real)
    await tab.send({"type": "ack", "seq": 1})
    await tab.send({"type": "ping"})  # answered once the ack before it is written
    assert (await tab.recv_type("pong"))["head"] == 1
    assert await database_sync_to_async(Delivery.objects.count)() == 0
    await tab.disconnect()


async def test_a_socket_that_cannot_attach_closes_with_4503(alice, monkeypatch):
    """With the database down at connect time the socket closes with 4503 (retry later)."""
    a1 = await new_client(alice)
    monkeypatch.setattr(client_services, "attach", database_down)
    assert await refused_with(alice, f"client_id={a1}") == 4503


async def test_a_failed_channel_layer_closes_4503_and_leaves_the_client_free(alice, monkeypatch):
    """If the channel layer fails while a socket joins its groups, the socket closes with 4503
    and the client is not left marked as connected (the cleanup could never forget it)."""
    a1 = await new_client(alice)

    async def layer_down(self, group, channel):
        raise ConnectionError("Error 111 connecting to redis")

    monkeypatch.setattr(type(get_channel_layer()), "group_add", layer_down)
    assert await refused_with(alice, f"client_id={a1}") == 4503
    client = await database_sync_to_async(Client.objects.get)(pk=a1)
    assert client.channel_name == ""


async def test_pokes_out_of_order_are_put_back_in_order_without_a_database_read(
    alice, bob, monkeypatch
):
    """Two sends that commit close together can push in the other order: the socket holds the
    later poke for a moment and sends both from the pokes, in seq order (a database read per
    reordering was a quarter of the server's time with 200 tabs)."""
    a1, b1 = await new_client(alice), await new_client(bob)
    ta = await connect_tab(alice, a1)
    tb = await connect_tab(bob, b1)
    captured: list = []
    monkeypatch.setattr(services, "channel_send_after_commit", captured.extend)
    for n in (1, 2):
        await tb.send(
            {"type": "send", "client_msg_id": f"m{n}", "to": {"user": "alice"}, "body": n}
        )
        await tb.recv_type("sent")
    channel = await database_sync_to_async(lambda: Client.objects.get(pk=a1).channel_name)()
    pokes = [event for name, event in captured if name == channel]
    assert [p["seq"] for p in pokes] == [1, 2]
    layer = get_channel_layer()
    for poke in reversed(pokes):
        marked = dict(poke, tail=poke["tail"].replace(f'"body":{poke["seq"]}', '"body":"poke"'))
        await layer.send(channel, marked)
    frames = await ta.deliveries(2)
    assert [(f["seq"], f["message"]["body"]) for f in frames] == [(1, "poke"), (2, "poke")]
    assert await ta.nothing()
    await ta.disconnect()
    await tb.disconnect()


async def first_poke_lost(alice, bob, monkeypatch):
    """
    Tabs of alice and bob; bob sends alice message 1 (body 1) and its push is lost.
    """
    a1, b1 = await new_client(alice), await new_client(bob)
    ta = await connect_tab(alice, a1)
    tb = await connect_tab(bob, b1)
    real = services.channel_send_after_commit
    monkeypatch.setattr(services, "channel_send_after_commit", lambda events: None)
    await tb.send({"type": "send", "client_msg_id": "m1", "to": {"user": "alice"}, "body": 1})
    await tb.recv_type("sent")
    monkeypatch.setattr(services, "channel_send_after_commit", real)
    return ta, tb


def record_gap_checks(monkeypatch, refuse: bool) -> list:
    # The gap checks sent through the channel layer; refused as by a full channel if `refuse`.
    layer = get_channel_layer()
    layer_send = layer.send
    sent: list = []

    async def send(channel, message):
        if message.get("type") == "messaging.gap":
            sent.append(channel)
            if refuse:
                raise ChannelFull(channel)
        return await layer_send(channel, message)

    monkeypatch.setattr(layer, "send", send)
    return sent


async def test_a_gap_check_goes_through_the_sockets_own_queue(alice, bob, monkeypatch):
    """Under daphne (and the test communicator) the check that reads a gap from the database
    joins the socket's own queue of messages: in turn with its other work, and never refused
    by a full channel layer."""
    ta, tb = await first_poke_lost(alice, bob, monkeypatch)
    through_layer = record_gap_checks(monkeypatch, refuse=True)
    await tb.send({"type": "send", "client_msg_id": "m2", "to": {"user": "alice"}, "body": 2})
    frames = await ta.deliveries(2, timeout=3)
    assert [(f["seq"], f["message"]["body"]) for f in frames] == [(1, 1), (2, 2)]
    assert through_layer == []
    await ta.disconnect()
    await tb.disconnect()


async def test_refused_gap_checks_are_retried_one_at_a_time_while_the_gap_lasts(
    alice, bob, monkeypatch
):
    """Elsewhere the check goes through the channel layer. Refused (a full channel), it is tried
    again every GAP_WAIT * 4 by one retry, and no more once the gap is gone (here: read by the
    tab's ping). Before, every refusal started a retry of its own, without end."""
    monkeypatch.setattr(consumers, "_own_queue", lambda receive: None)
    ta, tb = await first_poke_lost(alice, bob, monkeypatch)
    refused = record_gap_checks(monkeypatch, refuse=True)
    await tb.send({"type": "send", "client_msg_id": "m2", "to": {"user": "alice"}, "body": 2})
    await tb.recv_type("sent")
    await asyncio.sleep(consumers.GAP_WAIT + consumers.GAP_WAIT * 4 * 2.5)
    # Both tabs have the gap (the sender's tab gets its own message too): one chain each.
    per_tab = collections.Counter(refused)
    assert len(per_tab) == 2 and all(1 <= n <= 6 for n in per_tab.values()), per_tab
    for tab in (ta, tb):
        await tab.send({"type": "ping"})
    for tab in (ta, tb):
        frames = await tab.deliveries(2, timeout=3)
        assert [(f["seq"], f["message"]["body"]) for f in frames] == [(1, 1), (2, 2)]
        await tab.recv_type("pong")
    after_ping = len(refused)
    await asyncio.sleep(consumers.GAP_WAIT * 4 * 3)
    assert len(refused) <= after_ping + 2  # the ones on their way, if any; then none
    await ta.disconnect()
    await tb.disconnect()


async def test_a_gap_check_the_layer_refuses_is_tried_again(alice, bob, monkeypatch):
    """Through the channel layer, a refused check (a full channel, Redis restarting) is tried
    again rather than left to the tab's next ping."""
    monkeypatch.setattr(consumers, "_own_queue", lambda receive: None)
    ta, tb = await first_poke_lost(alice, bob, monkeypatch)
    layer = get_channel_layer()
    layer_send = layer.send
    refused: list = []

    async def refusing_one_gap_check(channel, message):
        if message.get("type") == "messaging.gap" and not refused:
            refused.append(channel)
            raise ChannelFull(channel)
        return await layer_send(channel, message)

    monkeypatch.setattr(layer, "send", refusing_one_gap_check)
    await tb.send({"type": "send", "client_msg_id": "m2", "to": {"user": "alice"}, "body": 2})
    frames = await ta.deliveries(2, timeout=3)
    assert [(f["seq"], f["message"]["body"]) for f in frames] == [(1, 1), (2, 2)]
    assert refused
    await ta.disconnect()
    await tb.disconnect()


async def test_a_lost_poke_is_noticed_by_the_next_one_and_read_from_the_database(
    alice, bob, monkeypatch
):
    """When one message's push is lost, the next push's seq shows the gap and the socket
    sends both from the database, in order, instead of skipping the first."""
    from clients import push

    ta, tb = await first_poke_lost(alice, bob, monkeypatch)
    await tb.send({"type": "send", "client_msg_id": "m2", "to": {"user": "alice"}, "body": 2})
    frames = await ta.deliveries(2)
    assert [(f["seq"], f["message"]["body"]) for f in frames] == [(1, 1), (2, 2)]
    assert push.channel_send_after_commit is services.channel_send_after_commit
    await ta.disconnect()
    await tb.disconnect()


async def test_a_full_channel_is_skipped_and_the_other_pushes_still_go_out(settings):
    """A push to a channel nobody reads (full) neither raises nor stops the pushes after it."""
    from clients.push import channel_send_now

    layer = get_channel_layer()
    if not hasattr(layer, "groups"):
        pytest.skip("fills a channel of the in-memory layer; push.py is the same on Redis")
    stuck, live = await layer.new_channel(), await layer.new_channel()
    capacity = layer.get_capacity(stuck)
    for _ in range(capacity):
        await layer.send(stuck, {"type": "x"})
    await database_sync_to_async(channel_send_now)([(stuck, {"type": "y"}), (live, {"type": "z"})])
    assert (await asyncio.wait_for(layer.receive(live), 2))["type"] == "z"


async def test_a_consumer_that_dies_mid_life_frees_its_client(alice, monkeypatch):
    """If the channel layer fails under a connected socket (Redis going away), the consumer
    dies, and its client is no longer marked as connected."""
    layer = get_channel_layer()
    if not hasattr(layer, "_clean_expired"):
        pytest.skip("fails the in-memory layer's receive; the consumer code is the same on Redis")
    a1 = await new_client(alice)
    tab = await connect_tab(alice, a1)

    def layer_gone(self):
        raise ConnectionError("Connection closed by server.")

    # The next receive of the consumer's channel fails, as channels-redis's does without Redis.
    monkeypatch.setattr(type(layer), "_clean_expired", layer_gone)
    # Wake the consumer's pending receive once, so its next receive meets the failed layer (a
    # poke would not: this process's pushes hand them to the socket directly).
    channel = await database_sync_to_async(
        lambda: Client.objects.values_list("channel_name", flat=True).get(pk=a1)
    )()
    await layer.send(channel, {"type": "messaging.gap"})
    with pytest.raises(ConnectionError):
        await tab.comm.wait(timeout=5)
    client = await database_sync_to_async(Client.objects.get)(pk=a1)
    assert client.channel_name == ""


async def test_a_socket_whose_presence_read_fails_stays_open(alice, monkeypatch):
    """Presence is ephemeral: a database failure while reading who is online (the last step of
    a connect) leaves the socket open and working, without presence frames."""
    from messaging import consumers

    monkeypatch.setattr(consumers, "online_peers", database_down)
    a1 = await new_client(alice)
    tab = await connect_tab(alice, a1)
    await tab.send({"type": "ping"})
    assert await tab.recv() == {"type": "pong", "head": 0}
    await tab.disconnect()


def connection_dropped(*args, **kwargs):
    # What Django raises when PostgreSQL ends the session (a failover, pg_terminate_backend).
    try:
        raise psycopg.errors.AdminShutdown("terminating connection due to administrator command")
    except psycopg.Error as exc:
        raise OperationalError(str(exc)) from exc


def no_connection_in_time(*args, **kwargs):
    # What Django raises when the pool has no connection to give within its timeout.
    try:
        raise PoolTimeout("couldn't get a connection after 2.00 sec")
    except psycopg.Error as exc:
        raise OperationalError(str(exc)) from exc


def raised_by(func) -> BaseException:
    try:
        func()
    except BaseException as exc:
        return exc
    raise AssertionError("nothing raised")


def test_a_dropped_connection_is_told_from_a_database_that_is_away():
    """Only a dropped connection is worth an immediate retry: not a pool timeout, nor an error
    without a driver's cause (SQLite's "database is locked" waited its timeout already)."""
    assert batching.connection_lost(raised_by(connection_dropped))
    lost = OperationalError("consuming input failed")
    lost.__cause__ = psycopg.OperationalError("consuming input failed: server closed")
    assert batching.connection_lost(lost)
    assert not batching.connection_lost(raised_by(no_connection_in_time))
    assert not batching.connection_lost(OperationalError("database is locked"))
    deadlock = OperationalError("deadlock detected")
    deadlock.__cause__ = psycopg.errors.DeadlockDetected("deadlock detected")
    assert not batching.connection_lost(deadlock)
    assert not batching.connection_lost(RuntimeError("boom"))


async def test_a_send_that_met_a_dropped_connection_is_stored_on_the_next_one(alice, monkeypatch):
    """A send whose transaction met a connection the database had dropped is stored again at
    once: the tab gets `sent` and no error frame, and the message is stored once."""
    a1 = await new_client(alice)
    tab = await connect_tab(alice, a1)
    real, calls = services._store, []

    def dropped_once(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            connection_dropped()
        return real(batch)

    monkeypatch.setattr(services, "_store", dropped_once)
    await tab.send({"type": "send", "client_msg_id": "m1", "to": {"user": "alice"}, "body": 1})
    sent = await tab.recv_type("sent")
    assert sent["duplicate"] is False and calls == [1, 1]
    assert not [f for f in tab.skipped if f["type"] == "error"]
    assert (await tab.deliveries(1))[0]["seq"] == 1
    assert await database_sync_to_async(Message.objects.count)() == 1
    await tab.disconnect()


async def test_only_the_sends_that_met_a_dropped_connection_are_stored_again(monkeypatch):
    """Of a batch, the sends stored (or refused) stay answered; those whose target's
    transaction met a dropped connection go once more, alone; a second failure is their answer."""
    from clients import push
    from clients.errors import NotFound

    async def no_backlog():
        return None

    monkeypatch.setattr(push, "caught_up", no_backlog)
    stored, refused = services.SendResult(7, False), NotFound("no such room", code="unknown_room")
    lost = raised_by(connection_dropped)
    answers = [[lost, stored, refused, lost], [services.SendResult(8, False), lost]]
    calls: list[list] = []

    def run_db(func, executor=None):
        async def call(requests):
            calls.append(list(requests))
            return answers[len(calls) - 1]

        return call

    batcher = sends.SendBatcher(run_db)
    futures = [batcher.submit(name) for name in ("a", "b", "c", "d")]
    done, _ = await asyncio.wait(futures, timeout=2)
    assert len(done) == 4
    assert calls == [["a", "b", "c", "d"], ["a", "d"]]
    assert futures[0].result() == services.SendResult(8, False)
    assert futures[1].result() is stored and futures[2].exception() is refused
    assert futures[3].exception() is lost


async def test_a_send_that_found_no_connection_in_time_is_not_retried(alice, monkeypatch):
    """With the database away the pool gives up after its wait: the send is answered
    `unavailable` then, not after a second wait."""
    a1 = await new_client(alice)
    tab = await connect_tab(alice, a1)
    calls = []

    def away(requests):
        calls.append(len(requests))
        no_connection_in_time()

    monkeypatch.setattr(services, "send_many", away)
    await tab.send({"type": "send", "client_msg_id": "m1", "to": {"user": "alice"}, "body": 1})
    error = await tab.recv_type("error")
    assert (error["code"], error["client_msg_id"], calls) == ("unavailable", "m1", [1])
    await tab.disconnect()


async def test_an_ack_that_met_a_dropped_connection_is_written_again_at_once(alice, monkeypatch):
    """An ack batch that met a dropped connection is written again without RETRY_AFTER's wait,
    and its socket gets no error frame."""
    from messaging import acks

    monkeypatch.setattr(acks, "RETRY_AFTER", 10.0)
    a1 = await new_client(alice)
    tab = await connect_tab(alice, a1)
    await tab.send({"type": "send", "client_msg_id": "m1", "to": {"user": "alice"}, "body": 1})
    assert (await tab.deliveries(1))[0]["seq"] == 1
    real, calls = services.ack_many, []

    def dropped_once(acks_by_client):
        calls.append(dict(acks_by_client))
        if len(calls) == 1:
            connection_dropped()
        return real(acks_by_client)

    monkeypatch.setattr(services, "ack_many", dropped_once)
    await tab.send({"type": "ack", "seq": 1})
    await tab.send({"type": "ping"})  # answered once the ack before it is written
    assert (await tab.recv_type("pong", timeout=3))["head"] == 1
    assert len(calls) == 2 and not [f for f in tab.skipped if f["type"] == "error"]
    assert await database_sync_to_async(Delivery.objects.count)() == 0
    await tab.disconnect()
