"""The Prometheus endpoint: who may read it, that it parses, and that its numbers move."""

import pytest
from channels.db import database_sync_to_async
from django.core.checks import run_checks
from django.db import OperationalError
from django.test import Client as HttpClient
from django.test import override_settings
from prometheus_client.parser import text_string_to_metric_families

from clients.cleanup import cleanup_clients
from clients.models import Client
from tests.conftest import api_post, connect_tab, http_as, new_client, register

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "s3cret-metrics-token"


def scrape(**extra) -> dict[str, float]:
    """
    GET /metrics with the token, parsed: {sample name with its labels: value}.
    """
    response = HttpClient().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}", **extra)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def moved(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_refused_to_everyone_when_not_configured(alice):
    """With neither a token nor addresses set, /metrics does not exist, for staff too."""
    assert HttpClient().get("/metrics").status_code == 404
    staff = http_as(alice)
    alice.is_staff = alice.is_superuser = True
    alice.save()
    assert staff.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 404


@override_settings(MESSAGING_METRICS_TOKEN=TOKEN)
def test_token_required():
    """A missing or wrong bearer token gets 401; the right one the metrics."""
    missing = HttpClient().get("/metrics")
    assert missing.status_code == 401 and missing["WWW-Authenticate"].startswith("Bearer")
    wrong = HttpClient().get("/metrics", HTTP_AUTHORIZATION="Bearer " + TOKEN[:-1] + "x")
    assert wrong.status_code == 401
    basic = HttpClient().get("/metrics", HTTP_AUTHORIZATION="Basic " + TOKEN)
    assert basic.status_code == 401
    assert "tabrelay_sends_total" in scrape()
    assert HttpClient().post("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 405


def test_allowed_addresses():
    """Only an allowed address or network reads /metrics; with a token as well, both count."""
    with override_settings(MESSAGING_METRICS_ALLOWED_IPS=["10.0.0.0/8", "::1"]):
        assert HttpClient(REMOTE_ADDR="127.0.0.1").get("/metrics").status_code == 403
        assert HttpClient(REMOTE_ADDR="10.1.2.3").get("/metrics").status_code == 200
        assert HttpClient(REMOTE_ADDR="::1").get("/metrics").status_code == 200
    with override_settings(
        MESSAGING_METRICS_ALLOWED_IPS="127.0.0.1", MESSAGING_METRICS_TOKEN=TOKEN
    ):
        assert HttpClient().get("/metrics").status_code == 401
        assert HttpClient(REMOTE_ADDR="10.1.2.3").get("/metrics").status_code == 403
        assert "tabrelay_clients" in scrape()


def test_forwarded_requests_and_other_methods_are_refused():
    """A request through a proxy, or one claiming an address with X-Forwarded-For (which
    daphne's --proxy-headers would take as REMOTE_ADDR), never reads /metrics; other methods
    get 405 only where the endpoint exists at all."""
    assert HttpClient().post("/metrics").status_code == 404  # off: nothing to see, whatever
    with override_settings(MESSAGING_METRICS_ALLOWED_IPS=["10.0.0.0/8"]):
        allowed = HttpClient(REMOTE_ADDR="10.1.2.3")
        assert allowed.get("/metrics", HTTP_X_FORWARDED_FOR="10.9.9.9").status_code == 404
        assert allowed.get("/metrics", HTTP_X_FORWARDED_PROTO="https").status_code == 404
        assert allowed.post("/metrics").status_code == 405
        assert allowed.get("/metrics").status_code == 200


def test_bad_allowed_address_is_a_system_check_error():
    """A METRICS_ALLOWED_IPS entry that is no address or network fails messaging.E007."""
    with override_settings(MESSAGING_METRICS_ALLOWED_IPS=["10.0.0.0/8", "localhost"]):
        assert "messaging.E007" in {e.id for e in run_checks()}
    assert "messaging.E007" not in {e.id for e in run_checks()}


@override_settings(MESSAGING_METRICS_TOKEN=TOKEN)
async def test_counters_move_when_messages_flow(alice, bob):
    """Sends, deliveries, acks, push and store latencies, closes and the gauges all move."""
    before = await database_sync_to_async(scrape)()
    a, b = await new_client(alice), await new_client(bob)
    tab_a, tab_b = await connect_tab(alice, a), await connect_tab(bob, b)
    during = await database_sync_to_async(scrape)()
    assert moved(before, during, "tabrelay_sockets") == 2
    assert during["tabrelay_clients_connected"] >= 2
    for i in range(3):
        frame = {"type": "send", "client_msg_id": f"m{i}", "to": {"user": "bob"}, "body": i}
        await tab_a.send(frame)
        await tab_a.recv_type("sent")
    await tab_a.send({"type": "send", "client_msg_id": "m0", "to": {"user": "bob"}, "body": 0})
    await tab_a.recv_type("sent")  # a retry
    await tab_a.send({"type": "send", "client_msg_id": "x", "to": {"user": "nobody"}, "body": 1})
    await tab_a.recv_type("error")
    frames = await tab_b.deliveries(3)
    await tab_a.deliveries(3)
    after_sends = await database_sync_to_async(scrape)()
    assert after_sends["tabrelay_queue_depth"] >= 6
    assert after_sends["tabrelay_queue_depth_max"] >= 3
    await tab_b.send({"type": "ack", "seq": frames[-1]["seq"]})
    await tab_b.send({"type": "ping"})
    await tab_b.recv_type("pong")  # answered once the ack before it is written
    await tab_a.disconnect()
    await tab_b.disconnect()
    after = await database_sync_to_async(scrape)()
    assert moved(before, after, "tabrelay_sends_total") == 3
    assert moved(before, after, "tabrelay_send_duplicates_total") == 1
    assert moved(before, after, "tabrelay_send_refusals_total{code=unknown_user}") == 1
    assert moved(before, after, "tabrelay_deliveries_total") == 6
    assert moved(before, after, "tabrelay_acks_total") >= 1
    assert moved(before, after, "tabrelay_send_store_seconds_count") == 5
    assert moved(before, after, "tabrelay_push_seconds_count") >= 3
    assert moved(before, after, "tabrelay_websocket_closes_total{code=1000}") == 2
    assert moved(before, after, "tabrelay_sockets") == 0
    assert after["tabrelay_queue_depth"] < after_sends["tabrelay_queue_depth"]
    assert after["tabrelay_database_up"] == 1


@override_settings(MESSAGING_METRICS_TOKEN=TOKEN)
def test_http_sends_acks_and_cleanup_runs_count(alice, bob):
    """The HTTP API's sends and acks count as the socket's do; so do cleanup runs."""
    before = scrape()
    http = http_as(alice, csrf=False)
    cid = register(http)
    response = api_post(
        http,
        "/api/messages/",
        {"client_id": cid, "client_msg_id": "h1", "to": {"user": "bob"}, "body": "hi"},
    )
    assert response.status_code in (200, 201), response.content
    assert api_post(http, f"/api/clients/{cid}/ack", {"seq": 1}).status_code == 200
    cleanup_clients()
    cleanup_clients(dry_run=True)
    after = scrape()
    assert moved(before, after, "tabrelay_sends_total") == 1
    assert moved(before, after, "tabrelay_acks_total") == 1
    assert moved(before, after, "tabrelay_cleanup_runs_total") == 1
    assert after["tabrelay_clients"] >= 1
    assert any(k.startswith("tabrelay_process_info{") for k in after)
    assert "process_cpu_seconds_total" in after


@override_settings(MESSAGING_METRICS_TOKEN=TOKEN, MESSAGING_QUEUE_LIMIT=2)
async def test_resyncs_and_resync_required_clients(alice, bob):
    """A queue past its bound marks the client resync_required and its tab gets a resync."""
    before = await database_sync_to_async(scrape)()
    a, b = await new_client(alice), await new_client(bob)
    tab_a, tab_b = await connect_tab(alice, a), await connect_tab(bob, b)
    for i in range(3):
        frame = {"type": "send", "client_msg_id": f"q{i}", "to": {"user": "bob"}, "body": i}
        await tab_a.send(frame)
        await tab_a.recv_type("sent")
    assert (await tab_b.recv_type("error"))["code"] == "resync_required"
    assert (await tab_a.recv_type("error"))["code"] == "resync_required"  # the sender's copy
    after = await database_sync_to_async(scrape)()
    await tab_a.disconnect()
    await tab_b.disconnect()
    assert moved(before, after, "tabrelay_resyncs_total") == 2
    assert after["tabrelay_clients_resync_required"] == 2
    assert after["tabrelay_queue_depth_max"] == 2


@override_settings(MESSAGING_METRICS_TOKEN=TOKEN)
def test_scrape_survives_the_database_being_away(monkeypatch):
    """Without the database the scrape still answers, with tabrelay_database_up 0."""

    def away(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(Client.objects, "aggregate", away)
    samples = scrape()
    assert samples["tabrelay_database_up"] == 0
    assert "tabrelay_clients" not in samples and "tabrelay_sends_total" in samples
