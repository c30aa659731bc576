"""Concurrent senders: per-client seqs stay gapless and unique, and a room has one order."""

import threading
from collections import defaultdict

import pytest
from django.db import connection

from clients.models import Client
from clients.services import register_client
from messaging import services
from messaging.models import Delivery, Message, Room

pytestmark = pytest.mark.django_db(transaction=True)

PER_SENDER = 40


def run_threads(targets: list) -> list[BaseException]:
    """
    Run each callable in its own thread (own database connection), all released at once.
    """
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                barrier.wait()
                fn()
            except BaseException as exc:  # reported to the test below
                errors.append(exc)
            finally:
                connection.close()

        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


def queues() -> dict[str, list[tuple[int, int]]]:
    result = defaultdict(list)
    for client_id, seq, message_id in Delivery.objects.order_by("client_id", "seq").values_list(
        "client_id", "seq", "message_id"
    ):
        result[str(client_id)].append((seq, message_id))
    return result


def test_two_tabs_sending_at_once_to_a_room_leave_no_gap_or_duplicate(alice, bob):
    """Two tabs of two users sending concurrently to one room give every client seqs 1..N and
    the same message order, which is also the history order."""
    room = Room.objects.create(name="busy")
    room.members.add(alice, bob)
    clients = [register_client(u) for u in (alice, alice, bob, bob)]
    senders = [(alice, clients[0]), (bob, clients[2])]

    def sender(user, client, tag):
        def go():
            for i in range(PER_SENDER):
                services.send_message(user, client.pk, f"{tag}-{i}", {"room": "busy"}, {"i": i})

        return go

    errors = run_threads([sender(u, c, f"s{n}") for n, (u, c) in enumerate(senders)])
    assert errors == []
    total = PER_SENDER * len(senders)
    history = list(Message.objects.filter(room=room).order_by("id").values_list("id", flat=True))
    assert len(history) == total
    by_client = queues()
    assert set(by_client) == {str(c.pk) for c in clients}
    for client in clients:
        entries = by_client[str(client.pk)]
        assert [seq for seq, _ in entries] == list(range(1, total + 1)), "gap or duplicate seq"
        assert [mid for _, mid in entries] == history, "room order differs between clients"
        assert Client.objects.get(pk=client.pk).head == total


def test_concurrent_direct_and_room_sends_do_not_deadlock_or_skip(alice, bob, carol):
    """Room sends and direct messages in both directions at once all land, gapless per client."""
    room = Room.objects.create(name="mixed")
    room.members.add(alice, bob, carol)
    a, b, c = (register_client(u) for u in (alice, bob, carol))

    def loop(user, client, to, tag):
        def go():
            for i in range(25):
                services.send_message(user, client.pk, f"{tag}{i}", to, i)

        return go

    errors = run_threads(
        [
            loop(alice, a, {"user": "bob"}, "ab"),
            loop(bob, b, {"user": "alice"}, "ba"),
            loop(carol, c, {"room": "mixed"}, "cr"),
            loop(alice, a, {"room": "mixed"}, "ar"),
        ]
    )
    assert errors == []
    assert Message.objects.count() == 100
    expected_heads = {a.pk: 100, b.pk: 100, c.pk: 50}  # carol sees only the two room streams
    for client_id, head in expected_heads.items():
        seqs = [s for s, _ in queues()[str(client_id)]]
        assert seqs == list(range(1, head + 1))
        assert Client.objects.get(pk=client_id).head == head


def test_concurrent_retries_of_one_message_store_it_once(alice, bob):
    """The same client_msg_id sent from several threads at once is stored and queued once."""
    a, b = register_client(alice), register_client(bob)
    results: list[services.SendResult] = []

    def go():
        results.append(services.send_message(alice, a.pk, "only-once", {"user": "bob"}, "x"))

    errors = run_threads([go] * 6)
    assert errors == []
    assert len(results) == 6
    assert sorted(r.duplicate for r in results) == [False] + [True] * 5
    assert len({r.id for r in results}) == 1
    assert Message.objects.count() == 1
    assert Delivery.objects.filter(client=b).count() == 1
    assert Delivery.objects.filter(client=a).count() == 1


def test_acks_racing_sends_never_delete_unacked_deliveries(alice, bob):
    """A client acking while messages arrive loses none above its ack."""
    a, b = register_client(alice), register_client(bob)
    acked = []

    def send():
        for i in range(60):
            services.send_message(bob, b.pk, f"m{i}", {"user": "alice"}, i)

    def ack():
        for _ in range(60):
            head = services.head_of(a.pk)
            acked.append(services.ack(alice, a.pk, head))

    errors = run_threads([send, ack])
    assert errors == []
    final_ack = max(acked)
    remaining = [s for s, _ in queues()[str(a.pk)]]
    assert remaining == list(range(final_ack + 1, 61))


def test_tabs_connecting_and_leaving_while_messages_arrive_never_deadlock(alice, bob):
    """Attach/detach of a user's tabs racing sends to that user: every send succeeds (on
    PostgreSQL a FOR UPDATE user lock here deadlocked against the message insert's foreign key)."""
    from clients.services import attach, detach

    a = register_client(alice)
    tabs = [register_client(bob) for _ in range(2)]

    def send():
        for i in range(60):
            services.send_message(alice, a.pk, f"m{i}", {"user": "bob"}, i)

    def flap(client):
        def go():
            for i in range(60):
                attach(bob, client.pk, f"specific.t!{client.pk}-{i}")
                detach(client.pk, f"specific.t!{client.pk}-{i}")

        return go

    errors = run_threads([send, *(flap(c) for c in tabs)])
    assert errors == []
    assert Message.objects.count() == 60
    for client in tabs:
        assert [s for s, _ in queues()[str(client.pk)]] == list(range(1, 61))
