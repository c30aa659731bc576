"""Sends stored in batches (messaging.sends, services.send_many): each send of a batch gets what
it would have got alone, every client numbers the batch's messages alike, and the process stores
no faster than its sockets get the messages (clients.push.caught_up)."""

import asyncio
import threading
import time
import uuid

import pytest

from clients import push
from clients.errors import Forbidden, NotFound
from clients.models import Client
from clients.services import register_client
from messaging import acks, batching, sends, services
from messaging.models import Delivery, Message
from tests.conftest import connect_tab, make_user, new_client

pytestmark = pytest.mark.django_db(transaction=True)


def request(user, client_id, cmid, to, body="x"):
    return services.send_request(user, client_id, cmid, to, body)


def queue_of(client_id) -> list[tuple[int, int]]:
    return list(
        Delivery.objects.filter(client_id=client_id).order_by("seq").values_list("seq", "message")
    )


def test_a_batch_gets_what_each_send_would_get_alone(alice, bob, carol):
    """Members' sends are stored in order; a non-member, a deleted client, a second copy of a
    send in the same batch and an unknown room each get their own answer; the rest are stored."""
    services.create_room(alice, "r")
    services.join_room(bob, "r")
    a1, b1, c1 = (register_client(u).pk for u in (alice, bob, carol))
    gone = register_client(bob).pk
    Client.objects.filter(pk=gone).delete()
    results = services.send_many(
        [
            request(alice, a1, "m1", {"room": "r"}),
            request(carol, c1, "m1", {"room": "r"}),  # not a member
            request(bob, b1, "m1", {"room": "r"}),
            request(alice, a1, "m1", {"room": "r"}),  # the first one again
            request(bob, gone, "m2", {"room": "r"}),  # a client deleted meanwhile
            request(bob, b1, "m3", {"room": "nowhere"}),
            request(alice, a1, "m4", {"user": "carol"}),  # another target: its own transaction
        ]
    )
    first, refused, second, again, deleted, unknown, direct = results
    assert isinstance(refused, Forbidden) and refused.code == "not_a_member"
    assert isinstance(deleted, NotFound) and deleted.code == "unknown_client"
    assert isinstance(unknown, NotFound) and unknown.code == "unknown_room"
    assert not first.duplicate and not second.duplicate and first.id < second.id
    assert again.duplicate and again.id == first.id
    assert not direct.duplicate
    assert Message.objects.count() == 3
    # Both room messages in one order, seqs 1 and 2, for every member client.
    assert queue_of(a1)[:2] == queue_of(b1) == [(1, first.id), (2, second.id)]
    assert queue_of(a1) == [(1, first.id), (2, second.id), (3, direct.id)]
    assert queue_of(c1) == [(1, direct.id)]
    assert Client.objects.get(pk=a1).head == 3 and Client.objects.get(pk=b1).head == 2


def test_a_batch_fills_a_queue_to_its_bound_then_asks_for_a_resync(alice, bob, settings):
    """A client takes the batch's messages up to MESSAGING_QUEUE_LIMIT, as one send after the
    other would have queued them, and is then marked resync_required."""
    settings.MESSAGING_QUEUE_LIMIT = 3
    services.create_room(alice, "r")
    services.join_room(bob, "r")
    a1, b1 = register_client(alice).pk, register_client(bob).pk
    services.send_message(alice, a1, "before", {"room": "r"}, 0)
    services.ack(bob, b1, 1)  # bob's tab is caught up; alice's still holds seq 1
    results = services.send_many([request(alice, a1, f"m{i}", {"room": "r"}) for i in range(3)])
    ids = [r.id for r in results]
    assert queue_of(a1)[1:] == [(2, ids[0]), (3, ids[1])]
    assert Client.objects.get(pk=a1).resync_required is True
    assert queue_of(b1) == [(2, ids[0]), (3, ids[1]), (4, ids[2])]
    assert Client.objects.get(pk=b1).resync_required is False


async def test_sends_of_several_sockets_at_once_are_stored_in_one_batch(alice, monkeypatch):
    """While one batch is being stored, the sends that arrive wait and go together in the next
    one; every socket gets its `sent`, and every tab the messages in one order (the same in
    every tab; the sockets do not order their sends among themselves)."""
    tabs = []
    for _ in range(4):
        tabs.append(await connect_tab(alice, await new_client(alice)))
    real, sizes = services.send_many, []
    started, release = threading.Event(), threading.Event()

    def held_first(requests):
        sizes.append(len(requests))
        if len(sizes) == 1:
            started.set()
            release.wait(5)
        return real(requests)

    monkeypatch.setattr(services, "send_many", held_first)
    for i, tab in enumerate(tabs):
        await tab.send(
            {"type": "send", "client_msg_id": f"m{i}", "to": {"user": "alice"}, "body": i}
        )
        if i == 0:
            assert await asyncio.to_thread(started.wait, 5)  # the first batch is being stored
    await asyncio.sleep(0.2)
    release.set()
    for tab in tabs:
        assert (await tab.recv_type("sent"))["duplicate"] is False
    assert sizes == [1, 3]
    orders = [[f["message"]["body"] for f in await tab.deliveries(4)] for tab in tabs]
    # 0 was stored alone, first; the other three in the order their sockets' frames reached
    # the batcher, which the sockets do not fix among themselves (CI once saw 3, 1, 2).
    assert orders[0][0] == 0 and sorted(orders[0]) == [0, 1, 2, 3]
    assert all(order == orders[0] for order in orders)
    for tab in tabs:
        await tab.disconnect()


async def test_sends_wait_while_the_process_has_pokes_to_hand_over(monkeypatch):
    """caught_up() returns at once under the bound, waits above it until the backlog drains,
    and gives up after BACKLOG_WAIT_MAX (a stuck push must not stop every send)."""
    monkeypatch.setattr(push, "BACKLOG_MAX", 10)
    monkeypatch.setattr(push, "BACKLOG_WAIT_MAX", 0.3)
    loop = asyncio.get_running_loop()
    pushes = push._pushes[loop] = push._Pushes()
    try:
        await asyncio.wait_for(push.caught_up(), 0.1)  # nothing pending

        async def slow_send_all(layer, events, background=None):
            await asyncio.sleep(0.1)

        for _ in range(3):  # 3 pushes of 5 events: 15 pending, over the bound of 10
            pushes.add((slow_send_all, None, [("c", {})] * 5, time.monotonic()))
        waited = loop.time()
        await push.caught_up()
        # The first push done leaves 10: the bound, so the wait ends there.
        # (Had it waited for all three, the backlog would be 0.)
        assert loop.time() - waited > 0.08 and pushes.backlog == 10

        def stuck(layer, events, background=None):
            return asyncio.sleep(10)

        pushes.add((stuck, None, [("c", {})] * 20, time.monotonic()))
        waited = loop.time()
        await push.caught_up()
        assert 0.25 < loop.time() - waited < 5  # BACKLOG_WAIT_MAX, not the stuck push
    finally:
        if pushes.task is not None:
            pushes.task.cancel()
        del push._pushes[loop]


async def test_acks_wait_while_a_send_is_stored_or_handed_over(monkeypatch):
    """A batch of acks is written after the send being stored and after the pokes being handed
    over, and no later than SENDS_FIRST_MAX when they take longer."""
    monkeypatch.setattr(acks, "SENDS_FIRST_MAX", 0.3)
    loop = asyncio.get_running_loop()
    written: list[float] = []

    def run_db(func, executor=None):
        async def call(*args):
            written.append(loop.time())

        return call

    sender = batching.of_this_loop(sends.SendBatcher, run_db)
    batcher = acks.AckBatcher(run_db)
    pushes = push._pushes[loop] = push._Pushes()
    try:
        await batcher.submit(uuid.uuid4(), 1)  # nothing going on: written at once
        assert len(written) == 1

        sender.storing = True
        ack = batcher.submit(uuid.uuid4(), 1)
        await asyncio.sleep(0.1)
        assert len(written) == 1  # waits for the send
        sender.storing = False
        pushes.backlog = 5  # its pokes are being handed over
        await asyncio.sleep(0.05)
        assert len(written) == 1
        pushes.backlog = 0
        await asyncio.wait_for(ack, 1)
        assert len(written) == 2

        sender.storing = True  # a send that never ends
        started = loop.time()
        await asyncio.wait_for(batcher.submit(uuid.uuid4(), 1), 2)
        assert 0.25 < written[-1] - started < 1.5
    finally:
        sender.storing = False
        del push._pushes[loop]


def test_sends_to_one_user_from_two_senders_are_stored_apart(alice, bob, carol):
    """A direct message's targets are its sender's and its recipient's clients: two senders'
    messages to one user in a batch reach each sender's own tabs only."""
    a1, b1, c1 = (register_client(u).pk for u in (alice, bob, carol))
    from_alice, from_bob = services.send_many(
        [request(alice, a1, "x", {"user": "carol"}), request(bob, b1, "x", {"user": "carol"})]
    )
    assert queue_of(a1) == [(1, from_alice.id)] and queue_of(b1) == [(1, from_bob.id)]
    assert queue_of(c1) == [(1, from_alice.id), (2, from_bob.id)]


def test_a_failed_transaction_fails_only_its_own_target(alice, bob, monkeypatch):
    """A database error in one target's transaction is that target's sends' answer; the other
    target's sends are stored."""
    make_user("dave")
    a1 = register_client(alice).pk
    services.create_room(alice, "r")
    real = services._store

    def broken_for_dave(batch):
        if batch[0].name == "dave":
            raise RuntimeError("boom")
        return real(batch)

    monkeypatch.setattr(services, "_store", broken_for_dave)
    failed, stored = services.send_many(
        [request(alice, a1, "1", {"user": "dave"}), request(alice, a1, "2", {"room": "r"})]
    )
    assert isinstance(failed, RuntimeError)
    assert not stored.duplicate and queue_of(a1) == [(1, stored.id)]
    assert not Message.objects.filter(client_msg_id="1").exists()


def test_a_second_copy_in_a_batch_is_a_duplicate_and_takes_no_rate_token(alice, settings):
    """A send and its retry in one batch: the retry is answered as a duplicate of the first,
    even with the rate bucket empty after the first."""
    settings.MESSAGING_SEND_RATE, settings.MESSAGING_SEND_BURST = 0.001, 1
    a1 = register_client(alice).pk
    first, again = services.send_many(
        [request(alice, a1, "m", {"user": "alice"}), request(alice, a1, "m", {"user": "alice"})]
    )
    assert not first.duplicate and again.duplicate and again.id == first.id
    (limited,) = services.send_many([request(alice, a1, "n", {"user": "alice"})])
    assert getattr(limited, "code", None) == "rate_limited"


async def test_a_batcher_that_fails_outside_the_database_call_settles_every_send(monkeypatch):
    """Whatever ends a batch early (here: the back-pressure check fails), every waiting send
    gets an error (the tab retries) instead of waiting for good."""
    from messaging import sends

    async def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(push, "caught_up", broken)
    batcher = sends.SendBatcher(lambda func, executor: func)
    futures = [batcher.submit(object()) for _ in range(3)]
    done, _ = await asyncio.wait(futures, timeout=2)
    assert len(done) == 3 and all(isinstance(f.exception(), RuntimeError) for f in futures)
