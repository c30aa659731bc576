"""
End to end in headless Chromium: the chat page and its library (messaging/static/messaging/relay.js)
against a real daphne process, tabs as Playwright pages, network cuts, reloads and closes.

Chromium comes from Debian (/usr/bin/chromium, installed by scripts/browser-deps), never from
`playwright install`. Without it these tests skip with a reason, except in CI (CI=true), where
that is a failure.
"""

import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, WebSocketRoute, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from tests.servers import Deployment, Server, Session

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CLOSE_GRACE = 3  # seconds a closing client has to come back (CLIENTS_CLOSE_GRACE)
CLEANUP_EVERY = 1  # seconds between cleanup runs (CLIENTS_CLEANUP_INTERVAL)
QUEUE_LIMIT = 30  # deliveries a client may hold (MESSAGING_QUEUE_LIMIT), small to fill fast
WAIT_MS = 20_000
USERS = {"alice": "alice-pass-1", "bob": "bob-pass-1", "carol": "carol-pass-1"}
SERVER_TOKEN = "p" * 40  # MESSAGING_SERVER_API_TOKEN: the server API publishes (docs/publish.md)


def _require_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    reason = f"no Chromium at {CHROMIUM}: run scripts/browser-deps (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _flush_channel_layer() -> None:
    """Replaces conftest's async fixture: these tests use no in-process channel layer, and
    Playwright's sync API keeps an event loop running in this thread."""


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """One daphne serving its own static files, with a short close grace, frequent cleanup and
    a small queue bound."""
    _require_chromium()
    deployment = Deployment(
        tmp_path_factory.mktemp("browser"),
        SERVE_STATIC="1",
        CLIENTS_CLOSE_GRACE=str(CLOSE_GRACE),
        CLIENTS_CLEANUP_INTERVAL=str(CLEANUP_EVERY),
        CLIENTS_HEARTBEAT_INTERVAL="1",
        MESSAGING_QUEUE_LIMIT=str(QUEUE_LIMIT),
        MESSAGING_SERVER_API_TOKEN=SERVER_TOKEN,
    )
    try:
        deployment.populate(USERS, {})
        yield deployment.start()
    finally:
        deployment.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright."""
    _require_chromium()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


class Network:
    """
    A context's network, cuttable. Chromium's offline emulation fails new requests but leaves
    open WebSockets alone, so sockets go through a route that can drop them and refuse new ones.
    """

    def __init__(self, context: BrowserContext) -> None:
        self.context = context
        self.up = True
        self.sockets: list[tuple[WebSocketRoute, WebSocketRoute]] = []
        context.route_web_socket(re.compile(r"/ws/"), self._route)

    def _route(self, ws: WebSocketRoute) -> None:
        if not self.up:
            ws.close(code=1001, reason="network down")
            return
        self.sockets.append((ws, ws.connect_to_server()))

    def cut(self) -> None:
        """Take the network away: requests fail, sockets drop, new sockets are refused."""
        self.up = False
        self.context.set_offline(True)
        for page_side, server_side in self.sockets:
            server_side.close()
            page_side.close(code=1001, reason="network down")
        self.sockets.clear()

    def restore(self) -> None:
        """Give the network back."""
        self.up = True
        self.context.set_offline(False)


class Tabs:
    """Browser contexts (one per user, or per tab that needs its own network) for one test."""

    def __init__(self, browser: Browser, server: Server) -> None:
        self.browser = browser
        self.server = server
        self.contexts: list[BrowserContext] = []
        self.console: dict[Page, list[str]] = {}

    def context(self, user: str) -> BrowserContext:
        """A new browser context (cookie jar, network) logged in as `user`."""
        session = Session(self.server.base_url)
        session.login(user, USERS[user])
        context = self.browser.new_context(viewport={"width": 1100, "height": 720})
        context.set_default_timeout(WAIT_MS)
        context.add_cookies(
            [
                {"name": c.name, "value": c.value or "", "url": self.server.base_url}
                for c in session.jar
            ]
        )
        self.contexts.append(context)
        return context

    def open(self, context: BrowserContext, room: str) -> Page:
        """A new tab on the chat page of `room`, once its library is online."""
        page = context.new_page()
        self.console[page] = []
        page.on("console", lambda msg: self.console[page].append(f"{msg.type}: {msg.text}"))
        page.goto(f"{self.server.base_url}/#{room}")
        wait_online(page)
        page.wait_for_selector(f"#room-title:has-text('{room}')")
        return page

    def close(self) -> None:
        """Close every context (and so every tab) this test opened."""
        for context in self.contexts:
            context.close()


@pytest.fixture
def tabs(browser: Browser, server: Server) -> Iterator[Tabs]:
    """Fresh contexts for a test, always closed."""
    opened = Tabs(browser, server)
    try:
        yield opened
    finally:
        opened.close()


def make_room(server: Server, name: str, *members: str) -> None:
    """Create a room as alice and have the other users join it, over the HTTP API."""
    for index, user in enumerate(("alice", *members)):
        session = Session(server.base_url)
        session.login(user, USERS[user])
        if index == 0:
            status, _ = session.request("POST", "/api/rooms/", {"name": name})
        else:
            status, _ = session.request("POST", f"/api/rooms/{name}/join")
        assert status in (200, 201)


def wait_online(page: Page) -> None:
    """Wait until the page's library says online (its socket got hello)."""
    page.wait_for_function("window.relay && window.relay.state === 'online'", timeout=WAIT_MS)


def shown(page: Page) -> list[str]:
    """The message texts the page shows, top to bottom."""
    return page.eval_on_selector_all("#messages .msg .text", "els => els.map(e => e.textContent)")


def expect_shown(page: Page, expected: list[str], timeout: float = WAIT_MS / 1000) -> None:
    """Wait until the page shows exactly `expected`, in order; fail with what it shows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if shown(page) == expected:
            return
        page.wait_for_timeout(100)
    assert shown(page) == expected


def received(page: Page) -> list[int]:
    """The message ids the library handed to the page, in order, since the page loaded."""
    return page.evaluate("window.chat.received")


def client_id(page: Page) -> str:
    """The tab's client id, as its library holds it."""
    return page.evaluate("window.relay.clientId")


def type_message(page: Page, text: str) -> None:
    """Type `text` into the composer and press Enter, as a person would."""
    page.fill("#composer-input", text)
    page.press("#composer-input", "Enter")


def send_burst(page: Page, room: str, texts: list[str], every_ms: int = 0) -> None:
    """Queue messages through the page's library (every `every_ms` apart, in the background)."""
    page.evaluate(
        """([room, texts, every]) => {
            texts.forEach((text, i) => {
                const go = () => window.relay.send({room}, {text});
                every ? setTimeout(go, i * every) : go();
            });
        }""",
        [room, texts, every_ms],
    )


def client_exists(session: Session, cid: str) -> bool:
    """Whether the server still knows the client (its queue answers 200, not 404)."""
    status, _ = session.request("GET", f"/api/clients/{cid}/messages?limit=1")
    assert status in (200, 404)
    return status == 200


def test_a_message_reaches_two_tabs_of_one_user_and_a_tab_of_another_once(tabs, server):
    """One message typed in one of alice's two tabs shows once in both, and once in bob's tab,
    as text; presence and typing reach the other user."""
    make_room(server, "three", "bob")
    alice = tabs.context("alice")
    first, second = tabs.open(alice, "three"), tabs.open(alice, "three")
    bob = tabs.open(tabs.context("bob"), "three")
    assert len({client_id(first), client_id(second), client_id(bob)}) == 3

    text = "hello <b>everyone</b> <img src=x onerror=alert(1)>"
    type_message(first, text)
    for page in (first, second, bob):
        expect_shown(page, [text])
        assert page.locator("#messages img, #messages b").count() == 0
        page.wait_for_function("window.chat.received.length >= 1")
    for page in (first, second, bob):
        assert len(received(page)) == 1
        expect_shown(page, [text])
    first.wait_for_selector("#messages .msg.own.sent")
    assert bob.locator("#messages .msg.own").count() == 0

    bob.wait_for_selector("#people .person.online[data-user='alice']")
    second.type("#composer-input", "typing...")
    bob.wait_for_selector("#typing:has-text('alice is typing')")


def test_an_offline_tab_catches_up_on_20_messages_once_in_order(tabs, server):
    """A tab whose network is cut while 20 messages are sent shows all 20 once, in order, when
    it comes back; the other tabs get them live meanwhile."""
    make_room(server, "catchup", "bob")
    alice = tabs.context("alice")
    sender, watcher = tabs.open(alice, "catchup"), tabs.open(alice, "catchup")
    bob_context = tabs.context("bob")
    network = Network(bob_context)
    bob = tabs.open(bob_context, "catchup")

    network.cut()
    bob.wait_for_function("['offline', 'reconnecting'].includes(window.relay.state)")
    texts = [f"message {n:02d}" for n in range(1, 21)]
    send_burst(sender, "catchup", texts)
    expect_shown(sender, texts)
    expect_shown(watcher, texts)
    assert shown(bob) == []

    network.restore()
    wait_online(bob)
    expect_shown(bob, texts)
    ids = received(bob)
    assert len(ids) == 20 and ids == sorted(set(ids))
    assert received(watcher) == ids


def test_a_reload_in_the_middle_keeps_the_client_and_shows_each_message_once(tabs, server):
    """A tab reloaded while messages stream in keeps its client id and, after the reload, shows
    every message once, in order; nothing processed before the reload comes again."""
    make_room(server, "reload", "bob")
    sender = tabs.open(tabs.context("alice"), "reload")
    bob = tabs.open(tabs.context("bob"), "reload")
    before_id = client_id(bob)
    texts = [f"stream {n:02d}" for n in range(1, 21)]

    send_burst(sender, "reload", texts, every_ms=120)
    bob.wait_for_function("window.chat.received.length >= 5")
    seen_before = received(bob)
    bob.reload()
    wait_online(bob)
    assert client_id(bob) == before_id
    expect_shown(sender, texts)
    expect_shown(bob, texts)
    seen_after = received(bob)
    assert not set(seen_before) & set(seen_after)
    assert seen_after == sorted(set(seen_after))


def test_a_message_typed_offline_is_delivered_once_after_reconnect_even_across_a_reload(
    tabs, server
):
    """A message typed with the network cut is shown pending, survives a reload (sessionStorage)
    and is delivered exactly once when the network is back."""
    make_room(server, "outbox", "bob")
    alice_context = tabs.context("alice")
    network = Network(alice_context)
    alice = tabs.open(alice_context, "outbox")
    bob = tabs.open(tabs.context("bob"), "outbox")

    network.cut()
    alice.wait_for_function("window.relay.state !== 'online'")
    type_message(alice, "written offline")
    alice.wait_for_selector("#messages .msg.pending:has-text('written offline')")

    # Reload with the page's assets reachable but every write still failing: sockets refused,
    # POSTs aborted (the HTTP fallback, the close beacon).
    def no_posts(route):
        if route.request.method == "POST":
            route.abort()
        else:
            route.continue_()

    alice_context.route("**/api/**", no_posts)
    alice_context.set_offline(False)
    alice.reload()
    alice.wait_for_selector("#messages .msg.pending:has-text('written offline')")
    alice.wait_for_timeout(1500)
    assert shown(bob) == []

    alice_context.unroute("**/api/**", no_posts)
    network.restore()
    wait_online(alice)
    alice.wait_for_selector("#messages .msg.sent:has-text('written offline')")
    expect_shown(alice, ["written offline"])
    expect_shown(bob, ["written offline"])
    assert alice.evaluate("window.relay.pending().length") == 0
    session = Session(server.base_url)
    session.login("bob", USERS["bob"])
    _, history = session.request("GET", "/api/rooms/outbox/messages")
    assert [m["body"] for m in history["messages"]] == [{"text": "written offline"}]


def test_a_duplicated_tab_gets_its_own_client_and_both_tabs_keep_receiving(tabs, server):
    """A tab opened with a copy of another tab's sessionStorage (a duplicated tab) takes the
    client over; the original hears 4409, registers a new client and says so in the console;
    both keep receiving."""
    make_room(server, "dupe", "bob")
    alice = tabs.context("alice")
    original = tabs.open(alice, "dupe")
    bob = tabs.open(tabs.context("bob"), "dupe")
    type_message(bob, "before the copy")
    expect_shown(original, ["before the copy"])
    shared = client_id(original)

    storage = original.evaluate("JSON.stringify(Object.entries(sessionStorage))")
    copy = alice.new_page()
    copy.goto(f"{server.base_url}/api/rooms/")  # same origin, no chat page: set storage first
    copy.evaluate(
        "(items) => JSON.parse(items).forEach(([k, v]) => sessionStorage.setItem(k, v))", storage
    )
    copy.goto(f"{server.base_url}/#dupe")
    wait_online(copy)
    try:
        original.wait_for_function(f"window.relay.clientId !== {json.dumps(shared)}")
    except PlaywrightError:
        state = "() => [relay.clientId, relay.state, sessionStorage.getItem('relay:conn')]"
        raise AssertionError(
            f"the original kept the client: original {original.evaluate(state)} "
            f"{tabs.console[original]}; copy {copy.evaluate(state)} {tabs.console.get(copy)}; "
            f"storage copied {storage}"
        ) from None
    wait_online(original)
    assert client_id(copy) == shared
    assert any("duplicated" in line for line in tabs.console[original])

    type_message(bob, "after the copy")
    type_message(copy, "from the copy")
    expected = ["before the copy", "after the copy", "from the copy"]
    for page in (original, copy, bob):
        expect_shown(page, expected)


def test_a_closed_tab_is_forgotten_after_the_grace_period_but_a_reload_keeps_it(tabs, server):
    """A reload keeps the client past the close grace period; closing the tab (pagehide beacon)
    gets its client deleted once the grace period is over, not at once."""
    make_room(server, "closing")
    page = tabs.open(tabs.context("alice"), "closing")
    cid = client_id(page)
    session = Session(server.base_url)
    session.login("alice", USERS["alice"])

    page.reload()
    wait_online(page)
    assert client_id(page) == cid
    time.sleep(CLOSE_GRACE + 2 * CLEANUP_EVERY + 1)
    assert client_exists(session, cid)

    page.close(run_before_unload=True)
    closed_at = time.monotonic()
    while client_exists(session, cid):
        assert time.monotonic() - closed_at < CLOSE_GRACE + 10, "closed client never deleted"
        time.sleep(0.25)
    assert time.monotonic() - closed_at >= CLOSE_GRACE - 0.5


def post_messages(server: Server, user: str, to: dict, texts: list[str]) -> None:
    """Send `texts` to `to` as `user` over the HTTP API, from a client registered for it."""
    session = Session(server.base_url)
    session.login(user, USERS[user])
    status, created = session.request("POST", "/api/clients/")
    assert status == 201
    for n, text in enumerate(texts):
        send = {"client_id": created["client_id"], "client_msg_id": str(n), "to": to}
        for _ in range(100):
            status, _ = session.request("POST", "/api/messages/", {**send, "body": {"text": text}})
            if status != 429:
                break
            time.sleep(0.2)  # rate limited: the same client_msg_id again is stored once
        assert status in (200, 201), status


def test_a_busy_room_scrolls_its_message_list_not_the_page(tabs, server):
    """With 100 messages in a room, the page itself does not scroll: the message box and the
    newest message are inside the window."""
    make_room(server, "busy")
    texts = [f"busy {n:03d}" for n in range(1, 101)]
    post_messages(server, "alice", {"room": "busy"}, texts)
    page = tabs.open(tabs.context("alice"), "busy")
    expect_shown(page, texts)
    geometry = page.evaluate(
        """() => {
            const box = (el) => { const r = el.getBoundingClientRect(); return [r.top, r.bottom]; };
            const rows = document.querySelectorAll('#messages .msg');
            return {
                page: document.scrollingElement.scrollHeight,
                window: window.innerHeight,
                composer: box(document.getElementById('composer-input')),
                newest: box(rows[rows.length - 1]),
            };
        }"""
    )
    height = geometry["window"]
    assert geometry["page"] <= height, geometry
    for top, bottom in (geometry["composer"], geometry["newest"]):
        assert 0 <= top and bottom <= height, geometry


def test_a_close_beacon_that_arrives_after_the_reload_does_not_close_the_reloaded_tab(tabs, server):
    """The old page's close beacon, held back until the reloaded page is online, does not mark
    the client: a network cut longer than the grace period later does not delete it."""
    make_room(server, "late-beacon")
    context = tabs.context("alice")
    # Hold every beacon back (keep its URL) so the test can deliver it late.
    context.add_init_script(
        """navigator.sendBeacon = (url) => {
            sessionStorage.setItem('test:beacons', JSON.stringify(
                [...JSON.parse(sessionStorage.getItem('test:beacons') || '[]'), String(url)]));
            return true;
        };"""
    )
    network = Network(context)
    page = tabs.open(context, "late-beacon")
    cid = client_id(page)
    page.reload()
    wait_online(page)
    status = page.evaluate(
        """async () => {
            const [url] = JSON.parse(sessionStorage.getItem('test:beacons'));
            const form = new FormData();
            form.append('csrfmiddlewaretoken', document.cookie.match(/csrftoken=([^;]+)/)[1]);
            return (await fetch(url, {method: 'POST', body: form})).status;
        }"""
    )
    assert status == 204

    network.cut()
    page.wait_for_function("window.relay.state !== 'online'")
    session = Session(server.base_url)
    session.login("alice", USERS["alice"])
    time.sleep(CLOSE_GRACE + 2 * CLEANUP_EVERY + 1)
    assert client_exists(session, cid)
    network.restore()
    wait_online(page)
    assert client_id(page) == cid


def test_a_direct_message_past_a_full_queue_is_shown_after_the_resync(tabs, server):
    """bob fills alice's offline tab's queue past the bound with direct messages; carol's
    direct message then goes to no queue. Back online, the tab is told to resync and shows
    carol's message and every one of bob's, from the direct-message history."""
    make_room(server, "flooded")
    context = tabs.context("alice")
    network = Network(context)
    page = tabs.open(context, "flooded")
    network.cut()
    page.wait_for_function("window.relay.state !== 'online'")
    flood = [f"flood {n:02d}" for n in range(QUEUE_LIMIT + 5)]
    post_messages(server, "bob", {"user": "alice"}, flood)
    post_messages(server, "carol", {"user": "alice"}, ["past the full queue"])

    network.restore()
    wait_online(page)
    page.click("#directs a[data-key='@carol']")
    page.wait_for_selector("#room-title:has-text('carol')")
    expect_shown(page, ["past the full queue"])
    page.click("#directs a[data-key='@bob']")
    expect_shown(page, flood)
    assert page.evaluate("window.relay.lastSeq") == QUEUE_LIMIT


def test_a_reload_without_the_server_shows_the_cached_room_and_the_outbox_at_once(tabs, server):
    """A tab reloaded while every API call and socket fails still shows its room, the message
    typed offline (pending) and an enabled message box, without waiting for the server."""
    make_room(server, "cached", "bob")
    type_message(tabs.open(tabs.context("bob"), "cached"), "from before")
    context = tabs.context("alice")
    network = Network(context)
    page = tabs.open(context, "cached")
    expect_shown(page, ["from before"])

    network.cut()
    page.wait_for_function("window.relay.state !== 'online'")
    type_message(page, "typed offline")
    context.route("**/api/**", lambda route: route.abort())
    context.set_offline(False)  # the page itself and its scripts still load
    page.reload()
    page.wait_for_selector("#messages .msg.pending:has-text('typed offline')", timeout=3000)
    assert page.text_content("#room-title") == "# cached"
    assert page.is_enabled("#composer-input")
    expect_shown(page, ["from before", "typed offline"], timeout=1)
    assert page.evaluate("window.relay.state") != "online"


def server_publish(server: Server, to: dict, text: str, sender: str) -> None:
    """Publish as the server, through POST /api/server/publish with the bearer token."""
    request = urllib.request.Request(
        f"{server.base_url}/api/server/publish",
        data=json.dumps({"to": to, "body": {"text": text}, "sender": sender}).encode(),
        headers={"Authorization": f"Bearer {SERVER_TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201


def test_the_servers_messages_are_shown_apart_and_cannot_be_answered(tabs, server):
    """A server message to a room shows in it set apart (class server, its sender label, no
    "own" mark); one to the user lands in a read-only Notices conversation."""
    make_room(server, "news", "bob")
    page = tabs.open(tabs.context("bob"), "news")
    server_publish(server, {"room": "news"}, "maintenance at 3", "ops")
    expect_shown(page, ["maintenance at 3"])
    row = page.locator("#messages .msg.server")
    assert row.count() == 1 and page.locator("#messages .msg.own").count() == 0
    assert row.locator(".author").inner_text().startswith("ops")

    server_publish(server, {"user": "bob"}, "your report is ready", "reports")
    page.wait_for_selector("#directs a[data-key='!notices'] .badge")
    page.click("#directs a[data-key='!notices']")
    page.wait_for_selector("#room-title:has-text('Notices')")
    expect_shown(page, ["your report is ready"])
    assert page.locator("#composer-input").is_disabled()

    # A new tab (a new client, an empty queue) finds the notice in the notices history.
    fresh = tabs.open(tabs.context("bob"), "news")
    fresh.click("#directs a[data-key='!notices']")
    expect_shown(fresh, ["your report is ready"])
