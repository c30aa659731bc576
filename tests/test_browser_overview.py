"""
The admin overview and /metrics of a real daphne, in headless Chromium: a chat tab connected,
messages sent through the HTTP API, a staff login through the admin's form; the page counts
them and draws them, and the process's /metrics counted them too.

With UPDATE_SCREENSHOTS=1 the test also stages an hour of earlier traffic and writes
docs/admin-overview.png.
"""

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.servers import Deployment, Server, Session
from tests.test_browser import (  # noqa: F401 (fixtures)
    _require_chromium,
    browser,
)

USERS = {"alice": "alice-pass-1", "bob": "bob-pass-1"}
OPERATOR = ("ops", "ops-pass-1")
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(autouse=True)
def _flush_channel_layer() -> None:
    """Replaces conftest's async fixture: no in-process channel layer here."""


@pytest.fixture
def server(tmp_path) -> Iterator[tuple[Deployment, Server]]:
    """One daphne, with /metrics open to the loopback address and a 1 s heartbeat."""
    _require_chromium()
    deployment = Deployment(
        tmp_path, SERVE_STATIC="1", METRICS_ALLOWED_IPS="127.0.0.1", CLIENTS_HEARTBEAT_INTERVAL="1"
    )
    try:
        deployment.populate(USERS, {"lobby": list(USERS)})
        deployment.manage(
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model as g; "
            f"g().objects.create_superuser({OPERATOR[0]!r}, password={OPERATOR[1]!r})",
        )
        yield deployment, deployment.start()
    finally:
        deployment.close()


def scrape(server: Server) -> dict[str, float]:
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, 0.0)
            samples[sample.name] += sample.value
            if sample.name == "tabrelay_process_info":
                samples["process_id=" + sample.labels["process_id"]] = 1.0
    return samples


def test_overview_and_metrics_with_real_traffic(server, browser):  # noqa: F811
    """A staff login finds the overview from the index, with the tab, the queue and the hour."""
    deployment, daphne = server
    base = daphne.base_url
    # alice's chat page: one connected tab.
    alice = Session(base)
    alice.login("alice", USERS["alice"])
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    context.add_cookies([{"name": c.name, "value": c.value or "", "url": base} for c in alice.jar])
    tab = context.new_page()
    tab.goto(f"{base}/#lobby")
    tab.wait_for_function("window.relay && window.relay.state === 'online'")
    # bob has a tab that never reads; alice sends from a program (a client of her own).
    bob = Session(base)
    bob.login("bob", USERS["bob"])
    status, bob_client = bob.request("POST", "/api/clients/")
    assert status == 201
    status, sender = alice.request("POST", "/api/clients/")
    assert status == 201
    sends = [({"room": "lobby"}, f"r{i}") for i in range(5)] + [({"user": "bob"}, "d0")] * 2
    for i, (to, text) in enumerate(sends):
        body = {"client_id": sender["client_id"], "client_msg_id": f"m{i}", "to": to}
        status, _ = alice.request("POST", "/api/messages/", {**body, "body": {"text": text}})
        assert status in (200, 201)
    tab.wait_for_function("window.relay.lastSeq >= 7", timeout=20_000)

    metrics = scrape(daphne)
    assert metrics["tabrelay_sockets"] == 1
    assert metrics["tabrelay_sends_total"] == 7
    assert metrics["tabrelay_deliveries_total"] >= 7  # alice's chat tab got every one
    assert metrics["tabrelay_push_seconds_count"] >= 7
    assert metrics["tabrelay_queue_depth_max"] == 7  # bob's silent client
    process_id = next(k.split("=", 1)[1] for k in metrics if k.startswith("process_id="))

    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.goto(f"{base}/admin/login/?next=/admin/")
    page.fill("#id_username", OPERATOR[0])
    page.fill("#id_password", OPERATOR[1])
    page.click("input[type=submit]")
    page.click("#tabrelay-operations a:has-text('Overview')")
    page.wait_for_selector("#messages-chart svg")
    assert page.text_content("[data-state='connected']") == "1"
    assert page.text_content("#messages-last-hour") == "7"
    row = page.locator(f"[data-process='{process_id}']")
    assert row.locator("[data-sockets]").text_content() == "1"
    queue = page.locator(f"[data-client='{bob_client['client_id']}'] [data-depth]")
    assert queue.text_content() == "7"
    assert page.locator("svg.tr-chart rect.room").count() >= 1
    assert page.locator("svg.tr-chart rect.direct").count() >= 1
    shot = page.screenshot(full_page=True)
    assert len(shot) > 10_000

    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        _stage_an_hour(deployment, sender["client_id"])
        page.reload()
        page.wait_for_selector("#messages-chart svg")
        page.screenshot(path=str(DOCS / "admin-overview.png"), full_page=True)
    context.close()


def _stage_an_hour(deployment: Deployment, client_id: str) -> None:
    """For the docs' screenshot only: earlier messages, as if the server had run an hour."""
    deployment.manage(
        "shell",
        "-c",
        (
            "import math, random\n"
            "from datetime import timedelta\n"
            "from django.contrib.auth import get_user_model\n"
            "from django.utils import timezone\n"
            "from messaging import services\n"
            "from messaging.models import Message\n"
            "alice = get_user_model().objects.get(username='alice')\n"
            f"cid = {client_id!r}\n"
            "rng = random.Random(5)\n"
            "now = timezone.now()\n"
            "for minute in range(1, 60):\n"
            "    n = int(6 + 5 * math.sin(minute / 7) + rng.randint(0, 4))\n"
            "    for j in range(n):\n"
            "        to = {'user': 'bob'} if j % 4 == 0 else {'room': 'lobby'}\n"
            "        r = services.send_message(alice, cid, f'h{minute}-{j}', to, j)\n"
            "        Message.objects.filter(pk=r.id).update(\n"
            "            created_at=now - timedelta(minutes=minute, seconds=j))\n"
        ),
        env={"MESSAGING_SEND_RATE": "none", "MESSAGING_USER_SEND_RATE": "none"},
    )


def test_every_process_serves_its_own_metrics(server, browser):  # noqa: F811
    """Two processes: each counts its own sockets and closes, both report the shared clients,
    and the overview lists each process with its tab."""
    deployment, first = server
    second = deployment.start()
    alice = Session(first.base_url)
    alice.login("alice", USERS["alice"])
    ids = [alice.request("POST", "/api/clients/")[1]["client_id"] for _ in range(2)]
    with (
        ws_connect(f"{first.ws_url}/ws/?client_id={ids[0]}", **_headers(alice, first)) as one,
        ws_connect(f"{second.ws_url}/ws/?client_id={ids[1]}", **_headers(alice, second)) as two,
    ):
        assert json.loads(one.recv(timeout=5))["type"] == "hello"
        assert json.loads(two.recv(timeout=5))["type"] == "hello"
        # A second socket of the first client on the first process supersedes it: 4409.
        with ws_connect(
            f"{first.ws_url}/ws/?client_id={ids[0]}", **_headers(alice, first)
        ) as again:
            assert json.loads(again.recv(timeout=5))["type"] == "hello"
            with pytest.raises(ConnectionClosed):
                while True:
                    one.recv(timeout=5)
            assert one.close_code == 4409
            scrapes = [scrape(first), scrape(second)]
            page = browser.new_page()
            page.goto(f"{first.base_url}/admin/login/?next=/admin/overview/")
            page.fill("#id_username", OPERATOR[0])
            page.fill("#id_password", OPERATOR[1])
            page.click("input[type=submit]")
            page.wait_for_selector("#processes")
            for metrics in scrapes:
                process_id = next(
                    k.split("=", 1)[1] for k in metrics if k.startswith("process_id=")
                )
                row = page.locator(f"[data-process='{process_id}'] [data-sockets]")
                assert row.text_content() == "1"
            assert page.text_content("[data-state='connected']") == "2"
    assert [m["tabrelay_sockets"] for m in scrapes] == [1, 1]
    assert [m["tabrelay_clients_connected"] for m in scrapes] == [2, 2]
    ids_seen = {k for m in scrapes for k in m if k.startswith("process_id=")}
    assert len(ids_seen) == 2
    assert _closes(first, "4409") == 1 and _closes(second, "4409") == 0


def _headers(session: Session, server: Server) -> dict:
    return {"additional_headers": session.ws_headers(server.base_url), "open_timeout": 5}


def _closes(server: Server, code: str) -> float:
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tabrelay_websocket_closes_total" and s.labels.get("code") == code
    )
