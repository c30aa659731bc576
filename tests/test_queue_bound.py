"""The queue bound: past MESSAGING_QUEUE_LIMIT a client is told resync_required, not grown."""

import pytest
from channels.db import database_sync_to_async

from clients.models import Client
from messaging.models import Delivery
from tests.conftest import api_post, connect_tab, http_as, new_client

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def state(client_id):
    row = Client.objects.get(pk=client_id)
    return row.head, row.resync_required, Delivery.objects.filter(client_id=client_id).count()


async def test_full_queue_gets_resync_required_and_stops_growing(alice, bob, settings):
    """A client at the queue limit gets no more deliveries and an error frame resync_required;
    acking its head (after reloading history) resumes queueing."""
    settings.MESSAGING_QUEUE_LIMIT = 3
    a1, b1 = await new_client(alice), await new_client(bob)
    ta = await connect_tab(alice, a1)
    tb = await connect_tab(bob, b1)
    for i in range(5):
        await tb.send(
            {"type": "send", "client_msg_id": f"m{i}", "to": {"user": "alice"}, "body": i}
        )
        await tb.recv_type("sent")
    got = await ta.deliveries(3)
    assert [f["seq"] for f in got] == [1, 2, 3]
    error = await ta.recv_type("error")
    assert error["code"] == "resync_required"
    assert await state(a1) == (3, True, 3)

    # Over HTTP the flag shows too, so a tab without a socket learns it.
    http = await database_sync_to_async(http_as)(alice)
    page = (await database_sync_to_async(http.get)(f"/api/clients/{a1}/messages")).json()
    assert page["head"] == 3 and page["resync_required"] is True

    # Reconnecting tells it again.
    await ta.disconnect()
    ta = await connect_tab(alice, a1, after=3)
    assert (await ta.recv_type("error"))["code"] == "resync_required"

    await ta.send({"type": "ack", "seq": 3})
    await ta.send({"type": "ping"})
    await ta.recv_type("pong")
    assert await state(a1) == (3, False, 0)
    await tb.send(
        {"type": "send", "client_msg_id": "after", "to": {"user": "alice"}, "body": "back"}
    )
    (frame,) = await ta.deliveries(1)
    assert frame["seq"] == 4 and frame["message"]["body"] == "back"
    await ta.disconnect()
    await tb.disconnect()


def test_partial_ack_keeps_the_resync_flag(alice, bob, settings):
    """Acking less than the head does not clear resync_required: messages were skipped."""
    settings.MESSAGING_QUEUE_LIMIT = 2
    http_a, http_b = http_as(alice), http_as(bob)
    a1 = api_post(http_a, "/api/clients/").json()["client_id"]
    b1 = api_post(http_b, "/api/clients/").json()["client_id"]
    for i in range(4):
        api_post(
            http_b,
            "/api/messages/",
            {"client_id": b1, "client_msg_id": str(i), "to": {"user": "alice"}, "body": i},
        )
    assert api_post(http_a, f"/api/clients/{a1}/ack", {"seq": 1}).json() == {"acked": 1}
    page = http_a.get(f"/api/clients/{a1}/messages").json()
    assert page["resync_required"] is True
    assert [d["seq"] for d in page["deliveries"]] == [2]
    assert api_post(http_a, f"/api/clients/{a1}/ack", {"seq": 2}).json() == {"acked": 2}
    assert "resync_required" not in http_a.get(f"/api/clients/{a1}/messages").json()


def test_batched_acks_follow_the_ack_rules(alice, bob, settings):
    """services.ack_many (the sockets' batched acks) acks as one HTTP ack would: cumulative, an
    ack above the head counts as the head, a lower one changes nothing, and acking the head of
    a client that must resync queues it again."""
    from clients.services import register_client
    from messaging import services

    settings.MESSAGING_QUEUE_LIMIT = 3
    sender = register_client(bob).pk
    low, high, full = (register_client(alice).pk for _ in range(3))
    for i in range(4):  # 4 messages: every alice client reaches the limit of 3 (resync)
        services.send_message(bob, sender, f"m{i}", {"user": "alice"}, i)

    def row(cid):
        c = Client.objects.get(pk=cid)
        left = sorted(Delivery.objects.filter(client_id=cid).values_list("seq", flat=True))
        return c.head, c.acked_seq, c.resync_required, left

    assert row(low) == (3, 0, True, [1, 2, 3])
    services.ack_many({low: 2, high: 99, full: 3})
    assert row(low) == (3, 2, True, [3])  # below the head: still resyncing
    assert row(high) == (3, 3, False, [])  # above the head: the head, and queued again
    assert row(full) == (3, 3, False, [])
    services.ack_many({low: 1})  # lower than acked: nothing changes
    assert row(low) == (3, 2, True, [3])
    services.send_message(bob, sender, "m9", {"user": "alice"}, 9)
    assert row(high) == (4, 3, False, [4])  # queued again after the resync
    assert row(low) == (3, 2, True, [3])  # still over the limit: nothing queued
