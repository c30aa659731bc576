"""Forgetting tabs: stale and expired-closing clients go, connected ones never, runs don't clash."""

import io
import threading
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from clients import services as client_services
from clients.cleanup import cleanup_clients
from clients.models import Client, Lease, ServerProcess
from clients.process import PROCESS_ID, heartbeat, take_lease
from clients.scheduler import run_cleanup_if_leader
from messaging import services
from messaging.models import Delivery, Message
from messaging.retention import prune_history

pytestmark = pytest.mark.django_db(transaction=True)
HOUR = 3600


def make(user, *, seen_ago: float = 0, connected: bool = False, closing_ago: float | None = None):
    now = timezone.now()
    client = client_services.register_client(user)
    Client.objects.filter(pk=client.pk).update(
        last_seen_at=now - timedelta(seconds=seen_ago),
        channel_name="specific.x!chan" if connected else "",
        server=PROCESS_ID if connected else "",
        closing_at=None if closing_ago is None else now - timedelta(seconds=closing_ago),
    )
    return client.pk


def test_removes_exactly_stale_and_expired_closing_clients(alice, bob, settings):
    """With the clock moved past the timeouts, exactly the stale and the expired-closing
    clients go, with their queues; fresh, connected and in-grace clients stay."""
    settings.CLIENTS_STALE_AFTER = 10 * HOUR
    settings.CLIENTS_CLOSE_GRACE = 30
    stale = make(alice, seen_ago=11 * HOUR)
    fresh = make(alice, seen_ago=9 * HOUR)
    connected_old = make(alice, seen_ago=50 * HOUR, connected=True)
    closing_expired = make(bob, closing_ago=31)
    closing_in_grace = make(bob, closing_ago=10)
    closing_but_connected = make(bob, closing_ago=999, connected=True)
    sender = make(bob)
    for i in range(3):
        services.send_message(bob, sender, f"m{i}", {"user": "alice"}, i)

    result = cleanup_clients()
    assert sorted(result.stale) == [stale]
    assert sorted(result.closed) == [closing_expired]
    # Both removed clients held the 3 messages: alice's stale tab as a recipient, bob's closing
    # tab as the sender's own tab.
    assert result.deliveries == 6
    left = set(Client.objects.values_list("id", flat=True))
    assert left == {fresh, connected_old, closing_in_grace, closing_but_connected, sender}
    assert not Delivery.objects.filter(client_id=stale).exists()


def test_moved_clock_decides_not_sleeps(alice, settings):
    """The same client is kept now and removed when the clock says the timeout has passed."""
    settings.CLIENTS_STALE_AFTER = HOUR
    cid = make(alice)
    assert cleanup_clients().total == 0
    later = timezone.now() + timedelta(seconds=HOUR + 1)
    assert cleanup_clients(now=later).stale == [cid]


def test_dry_run_removes_nothing(alice, settings):
    """--dry-run reports what would go and deletes nothing."""
    settings.CLIENTS_STALE_AFTER = HOUR
    cid = make(alice, seen_ago=2 * HOUR)
    assert cleanup_clients(dry_run=True).stale == [cid]
    assert Client.objects.filter(pk=cid).exists()


def test_two_cleanups_at_once_do_not_conflict(alice, settings):
    """Two concurrent runs delete every stale client exactly once between them, without error."""
    settings.CLIENTS_STALE_AFTER = HOUR
    settings.CLIENTS_MAX_PER_USER = None  # 61 clients of one user
    ids = {make(alice, seen_ago=2 * HOUR) for _ in range(60)}
    keep = make(alice, connected=True, seen_ago=5 * HOUR)
    results, errors = [], []
    barrier = threading.Barrier(2)

    def run():
        try:
            barrier.wait()
            results.append(cleanup_clients(batch_size=7))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    removed = [cid for r in results for cid in r.stale]
    assert sorted(removed) == sorted(ids), "a client was deleted twice or not at all"
    assert list(Client.objects.values_list("id", flat=True)) == [keep]


def test_a_client_that_connects_during_cleanup_survives(alice, settings, monkeypatch):
    """The delete re-checks 'not connected': a tab that attaches between cleanup's look-up and
    its delete stays."""
    settings.CLIENTS_STALE_AFTER = HOUR
    cid = make(alice, seen_ago=2 * HOUR)
    other = make(alice, seen_ago=2 * HOUR)
    import clients.cleanup as cleanup_module

    real_atomic = cleanup_module.transaction.atomic

    class RacingTransaction:
        @staticmethod
        def atomic(*args, **kwargs):
            # The look-up is done; the tab attaches now, just before the delete's transaction.
            Client.objects.filter(pk=cid).update(channel_name="specific.y!c")
            return real_atomic(*args, **kwargs)

    monkeypatch.setattr(cleanup_module, "transaction", RacingTransaction)
    result = cleanup_clients()
    assert result.stale == [other]
    assert Client.objects.filter(pk=cid).exists()


def test_sockets_of_a_dead_process_are_marked_disconnected(alice, settings):
    """A process that stopped heart-beating has its sockets detached (as of its last beat) and
    is forgotten; a live process's sockets are left alone."""
    settings.CLIENTS_PROCESS_TIMEOUT = 30
    long_ago = timezone.now() - timedelta(seconds=120)
    ServerProcess.objects.create(id="dead-1", heartbeat_at=long_ago)
    ServerProcess.objects.create(id="live-1", heartbeat_at=timezone.now())
    orphan = make(alice)
    Client.objects.filter(pk=orphan).update(channel_name="specific.d!1", server="dead-1")
    alive = make(alice)
    Client.objects.filter(pk=alive).update(channel_name="specific.l!1", server="live-1")

    result = cleanup_clients()
    assert result.dead_processes == ["dead-1"] and result.healed == 1
    row = Client.objects.get(pk=orphan)
    assert row.channel_name == "" and row.last_seen_at == long_ago
    assert Client.objects.get(pk=alive).channel_name == "specific.l!1"
    assert list(ServerProcess.objects.values_list("id", flat=True)) == ["live-1"]


def test_lease_lets_one_process_run_the_periodic_cleanup(db, settings):
    """Only one holder of the cleanup lease per interval; it frees up when it expires."""
    settings.CLIENTS_CLEANUP_INTERVAL = 60
    assert run_cleanup_if_leader() is True
    assert run_cleanup_if_leader() is False
    Lease.objects.filter(name="cleanup").update(holder="other", expires_at=timezone.now())
    assert take_lease("cleanup", 60) is True
    assert Lease.objects.get(name="cleanup").holder == PROCESS_ID


def test_heartbeat_creates_and_refreshes_this_process(db):
    """The heartbeat registers this process once and moves its timestamp."""
    heartbeat(timezone.now() - timedelta(seconds=100))
    first = ServerProcess.objects.get(pk=PROCESS_ID).heartbeat_at
    heartbeat()
    assert ServerProcess.objects.get(pk=PROCESS_ID).heartbeat_at > first
    assert ServerProcess.objects.count() == 1


def test_command_reports_a_clear_summary(alice, settings):
    """manage.py cleanup_clients --older-than and --dry-run print what they (would) remove."""
    settings.CLIENTS_STALE_AFTER = 100 * HOUR
    cid = make(alice, seen_ago=2 * HOUR)
    out = io.StringIO()
    call_command("cleanup_clients", "--older-than", "1h", "--dry-run", "-v", "2", stdout=out)
    text = out.getvalue()
    assert "Would remove 1 client(s): 1 stale" in text and str(cid) in text
    assert Client.objects.filter(pk=cid).exists()
    out = io.StringIO()
    call_command("cleanup_clients", "--older-than", "3h", stdout=out)
    assert "Removed 0 client(s)" in out.getvalue()
    out = io.StringIO()
    call_command("cleanup_clients", "--older-than", "1h", stdout=out)
    assert "Removed 1 client(s): 1 stale" in out.getvalue()
    assert not Client.objects.filter(pk=cid).exists()


def test_command_rejects_a_bad_duration(db):
    """A malformed --older-than is a clear error, not a traceback."""
    from django.core.management import CommandError

    with pytest.raises(CommandError, match="not a duration"):
        call_command("cleanup_clients", "--older-than", "soon")


def test_history_retention_keeps_queued_messages(alice, bob, settings):
    """Old messages go only once no queue holds them; recent ones stay."""
    settings.MESSAGING_HISTORY_RETENTION = HOUR
    a, b = make(alice), make(bob)
    old = services.send_message(alice, a, "old", {"user": "bob"}, 1).id
    queued_old = services.send_message(alice, a, "queued", {"user": "bob"}, 2).id
    Message.objects.filter(id__in=[old, queued_old]).update(
        created_at=timezone.now() - timedelta(seconds=2 * HOUR)
    )
    recent = services.send_message(alice, a, "new", {"user": "bob"}, 3).id
    services.ack(alice, a, 3)
    services.ack(bob, b, 1)  # bob still holds queued_old (seq 2)
    assert "removed 1 message" in prune_history()
    assert set(Message.objects.values_list("id", flat=True)) == {queued_old, recent}
