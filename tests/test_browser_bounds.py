"""
The clients-per-user bound in headless Chromium: a user who opens one tab more than
CLIENTS_MAX_PER_USER gets a working tab, the least recently seen tab pauses (close code 4429)
instead of evicting another in turn, and comes back, with its message, when it is used again.
"""

from collections.abc import Iterator

import pytest

from tests.servers import Deployment, Server
from tests.test_browser import (  # noqa: F401 (fixtures)
    USERS,
    _flush_channel_layer,
    _require_chromium,
    browser,
    expect_shown,
    make_room,
    tabs,
    type_message,
    wait_online,
)

LIMIT = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """One daphne that keeps at most LIMIT clients per user."""
    _require_chromium()
    deployment = Deployment(
        tmp_path_factory.mktemp("browser-bounds"),
        SERVE_STATIC="1",
        CLIENTS_MAX_PER_USER=str(LIMIT),
    )
    try:
        deployment.populate(USERS, {})
        yield deployment.start()
    finally:
        deployment.close()


def state(page) -> str:
    return page.evaluate("window.relay.state")


def test_one_tab_past_the_bound_works_and_the_oldest_pauses_until_used(tabs, server):  # noqa: F811
    """With CLIENTS_MAX_PER_USER = 3, a 4th tab sends and receives; the least recently seen tab
    pauses (state evicted) while the other two keep working; typing in the paused tab brings it
    back with its message delivered and history reloaded, pausing one other tab (no ping-pong)."""
    make_room(server, "crowd")
    alice = tabs.context("alice")
    pages = [tabs.open(alice, "crowd") for _ in range(LIMIT)]
    fourth = tabs.open(alice, "crowd")
    first, live = pages[0], [*pages[1:], fourth]
    first.wait_for_function("window.relay.state === 'evicted'")
    first.wait_for_selector("#banner:has-text('Paused')")

    type_message(fourth, "from tab four")
    for page in live:
        expect_shown(page, ["from tab four"])
        assert state(page) == "online"

    type_message(first, "tab one is back")
    wait_online(first)
    expect_shown(first, ["from tab four", "tab one is back"])
    first.wait_for_function("window.relay.pending().length === 0")  # stored, not only shown
    # Exactly one other tab paused to make room, and the paused tabs stay paused.
    live[0].wait_for_timeout(1000)
    states = [state(page) for page in live]
    assert sorted(states) == ["evicted", "online", "online"], states
    for page, st in zip(live, states, strict=True):
        if st == "online":
            expect_shown(page, ["from tab four", "tab one is back"])
    assert state(first) == "online"
