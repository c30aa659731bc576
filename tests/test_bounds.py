"""Per-user bounds (one user must not multiply his share): clients per user, the send rate per
user across processes, rooms per user, typing and ping frames."""

import asyncio
import threading
import time
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.utils import timezone

from clients.models import Client
from clients.services import attach, register_client
from tests.conftest import api_post, connect_tab, http_as, new_client

pytestmark = pytest.mark.django_db(transaction=True)


def send_frame(cmid, to, body) -> dict:
    return {"type": "send", "client_msg_id": cmid, "to": to, "body": body}


@database_sync_to_async
def client_ids(user) -> set[str]:
    return {str(pk) for pk in Client.objects.filter(user=user).values_list("pk", flat=True)}


# -- clients per user -----------------------------------------------------------------------


def test_registering_past_the_bound_evicts_closing_then_disconnected_then_oldest(alice, settings):
    """Past CLIENTS_MAX_PER_USER a register evicts a closing client first, then the least
    recently seen one without a socket, and a live one only when no other is left."""
    settings.CLIENTS_MAX_PER_USER = 3
    now = timezone.now()
    live_old, idle_old, idle_new = (register_client(alice) for _ in range(3))
    attach(alice, live_old.pk, "specific.x!live")
    for client, ago in ((live_old, 300), (idle_old, 200), (idle_new, 100)):
        Client.objects.filter(pk=client.pk).update(last_seen_at=now - timedelta(seconds=ago))
    Client.objects.filter(pk=idle_new.pk).update(closing_at=now)

    fourth = register_client(alice)  # the closing one goes, though seen last
    assert set(Client.objects.filter(user=alice).values_list("pk", flat=True)) == {
        live_old.pk,
        idle_old.pk,
        fourth.pk,
    }
    attach(alice, fourth.pk, "specific.x!fourth")
    fifth = register_client(alice)  # then the idle one
    assert not Client.objects.filter(pk=idle_old.pk).exists()
    attach(alice, fifth.pk, "specific.x!fifth")
    register_client(alice)  # all live: the least recently seen live one
    assert not Client.objects.filter(pk=live_old.pk).exists()
    assert Client.objects.filter(user=alice).count() == 3


def test_concurrent_registers_never_exceed_the_bound(alice, settings):
    """Registers of one user racing each other leave at most CLIENTS_MAX_PER_USER clients."""
    settings.CLIENTS_MAX_PER_USER = 3
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def run() -> None:
        try:
            barrier.wait()
            for _ in range(3):
                register_client(alice)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert Client.objects.filter(user=alice).count() == 3


async def test_a_live_tab_evicted_for_a_new_one_closes_with_4429(alice, bob, settings):
    """With every client live, registering one more closes the least recently seen tab with
    4429 (its client is gone) while the others and the new tab work."""
    settings.CLIENTS_MAX_PER_USER = 2
    first = await new_client(alice)
    tab1 = await connect_tab(alice, first)
    second = await new_client(alice)
    tab2 = await connect_tab(alice, second)
    third = await new_client(alice)
    assert await tab1.close_code() == 4429
    assert await client_ids(alice) == {second, third}
    tab3 = await connect_tab(alice, third)
    await tab3.send(send_frame("m1", {"user": "alice"}, "hi"))
    for tab in (tab2, tab3):
        assert (await tab.deliveries(1))[0]["message"]["body"] == "hi"
    assert (await tab3.recv_type("sent"))["client_msg_id"] == "m1"
    for tab in (tab1, tab2, tab3):
        await tab.disconnect()


def test_no_bound_when_the_setting_is_none(alice, settings):
    """CLIENTS_MAX_PER_USER = None registers without evicting."""
    settings.CLIENTS_MAX_PER_USER = None
    for _ in range(4):
        register_client(alice)
    assert Client.objects.filter(user=alice).count() == 4


# -- the send rate per user, across processes --------------------------------------------------


def http_send(user, client_id: str, cmid: str) -> int:
    payload = {"client_id": client_id, "client_msg_id": cmid, "to": {"user": "bob"}, "body": 1}
    return api_post(http_as(user), "/api/messages/", payload).status_code


async def test_a_users_tabs_share_one_send_allowance(alice, bob, settings):
    """Two clients of one user together get MESSAGING_USER_SEND_BURST sends, over HTTP and
    WebSocket alike; the next is refused rate_limited though each client is under its own."""
    settings.MESSAGING_SEND_RATE, settings.MESSAGING_SEND_BURST = 0.001, 10
    settings.MESSAGING_USER_SEND_RATE, settings.MESSAGING_USER_SEND_BURST = 0.001, 3
    a1, a2 = await new_client(alice), await new_client(alice)
    send = database_sync_to_async(http_send)
    assert await send(alice, a1, "h1") == 201
    assert await send(alice, a2, "h2") == 201
    tab = await connect_tab(alice, a2)
    await tab.send(send_frame("w1", {"user": "bob"}, 1))
    assert (await tab.recv_type("sent"))["client_msg_id"] == "w1"
    await tab.send(send_frame("w2", {"user": "bob"}, 2))
    refused = await tab.recv_type("error")
    assert refused["code"] == "rate_limited" and refused["client_msg_id"] == "w2", refused
    assert await send(alice, a1, "h3") == 429
    assert await send(bob, await new_client(bob), "b1") == 201  # another user's own allowance
    await tab.disconnect()


@pytest.fixture
def redis_buckets(settings):
    """The send buckets in the Redis of REDIS_URL (skipped without one), under a key prefix
    of this test's own, deleted afterwards."""
    import os
    import uuid

    import redis

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    conn = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        conn.ping()
    except redis.RedisError as exc:
        if os.environ.get("REQUIRE_SERVICES"):
            raise
        pytest.skip(f"no Redis at {url}: {exc}")
    settings.MESSAGING_RATE_REDIS_URL = url
    settings.MESSAGING_RATE_REDIS_PREFIX = prefix = f"test-bounds-{uuid.uuid4().hex[:12]}"
    yield
    for key in conn.scan_iter(f"{prefix}:*"):
        conn.delete(key)
    conn.close()


def test_redis_buckets_are_shared_by_processes_and_refill(redis_buckets, settings):
    """Two processes' limiters (two SendRate objects) share each client's and each user's
    bucket in Redis: a send takes from both or neither, and tokens come back at the rate."""
    from messaging.ratelimit import SendRate

    settings.MESSAGING_SEND_RATE, settings.MESSAGING_SEND_BURST = 0.001, 2
    settings.MESSAGING_USER_SEND_RATE, settings.MESSAGING_USER_SEND_BURST = 5.0, 3
    one, two = SendRate(), SendRate()
    assert one.take_many([("c1", "u"), ("c1", "u")]) == [True, True]
    assert two.take_many([("c1", "u"), ("c2", "u"), ("c2", "u")]) == [False, True, False]
    assert one.take("c3", "u") is False  # the user's bucket is empty
    assert two.take("c4", "v") is True  # another user's is not
    time.sleep(0.25)  # one user token back at 5/s
    assert one.take("c3", "u") is True and two.take("c3", "u") is False


def test_a_redis_that_does_not_answer_costs_one_short_wait(settings):
    """A Redis that accepts connections and never answers holds one batch of sends for at most
    the limiter's short timeout; the batches after it use this process's buckets at once,
    still bounded, instead of waiting again each time."""
    import socket

    from messaging import ratelimit

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        settings.MESSAGING_RATE_REDIS_URL = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        settings.MESSAGING_SEND_RATE, settings.MESSAGING_SEND_BURST = 0.001, 2
        limiter = ratelimit.SendRate()
        started = time.monotonic()
        assert limiter.take("c1", "u") is True  # after the timeout, from the local bucket
        first = time.monotonic() - started
        started = time.monotonic()
        assert limiter.take_many([("c1", "u"), ("c1", "u")]) == [True, False]
        again = time.monotonic() - started
    finally:
        silent.close()
    assert first < ratelimit.REDIS_TIMEOUT * 3, first
    assert again < 0.1, again


# -- rooms, typing and pings ------------------------------------------------------------------


async def frames_until_quiet(tab) -> list[dict]:
    # Every frame but presence until the socket is quiet for a moment.
    frames = []
    while not await tab.nothing(0.3):
        frame = await tab.recv()
        if frame["type"] != "presence":
            frames.append(frame)
    return frames


@database_sync_to_async
def lobby(*users) -> None:
    from messaging import services

    services.create_room(users[0], "lobby")
    for user in users[1:]:
        services.join_room(user, "lobby")


def test_rooms_per_user_are_bounded_with_409_too_many_rooms(alice, bob, settings):
    """Past MESSAGING_MAX_ROOMS_PER_USER rooms created, a user's next create is 409
    too_many_rooms; other users still create theirs."""
    settings.MESSAGING_MAX_ROOMS_PER_USER = 2
    http = http_as(alice)
    for name in ("r1", "r2"):
        assert api_post(http, "/api/rooms/", {"name": name}).status_code == 201
    refused = api_post(http, "/api/rooms/", {"name": "r3"})
    assert refused.status_code == 409, refused.content
    assert refused.json()["error"]["code"] == "too_many_rooms"
    assert refused.json()["error"]["detail"]
    assert api_post(http_as(bob), "/api/rooms/", {"name": "r3"}).status_code == 201


async def test_typing_is_relayed_once_per_interval_and_the_excess_gets_one_error(
    alice, bob, settings
):
    """A burst of typing frames in one room reaches the other members once; the sender gets one
    rate_limited error frame for the rest, and typing is relayed again after the interval."""
    settings.MESSAGING_TYPING_INTERVAL = 0.5
    await lobby(alice, bob)
    ta = await connect_tab(alice, await new_client(alice))
    tb = await connect_tab(bob, await new_client(bob))
    for _ in range(20):
        await ta.send({"type": "typing", "room": "lobby"})
    assert await tb.recv_type("typing") == {"type": "typing", "room": "lobby", "user": "alice"}
    error = await ta.recv_type("error")
    assert error["code"] == "rate_limited", error
    assert await frames_until_quiet(tb) == [] and await frames_until_quiet(ta) == []
    await asyncio.sleep(0.5)
    await ta.send({"type": "typing", "room": "lobby"})
    assert await tb.recv_type("typing") == {"type": "typing", "room": "lobby", "user": "alice"}
    await ta.disconnect()
    await tb.disconnect()


async def test_typing_in_ever_new_rooms_is_bounded_too(alice, settings):
    """Typing frames naming a new room each time are looked up for a few rooms per interval
    only; the rest get one rate_limited error frame."""
    settings.MESSAGING_TYPING_INTERVAL = 5.0
    ta = await connect_tab(alice, await new_client(alice))
    for i in range(30):
        await ta.send({"type": "typing", "room": f"nowhere-{i}"})
    codes = [frame["code"] for frame in await frames_until_quiet(ta)]
    assert codes == ["unknown_room"] * 8 + ["rate_limited"], codes
    await ta.disconnect()


async def test_pings_past_the_burst_get_one_rate_limited_error(alice, settings):
    """Past MESSAGING_PING_BURST pings a socket's next ping gets a rate_limited error frame
    (later ones nothing) until its bucket refills; the socket stays usable."""
    settings.MESSAGING_PING_RATE, settings.MESSAGING_PING_BURST = 2.0, 3
    ta = await connect_tab(alice, await new_client(alice))
    for _ in range(10):
        await ta.send({"type": "ping"})
    frames = [await ta.recv() for _ in range(4)]
    assert frames[:3] == [{"type": "pong", "head": 0}] * 3
    assert frames[3]["type"] == "error" and frames[3]["code"] == "rate_limited", frames
    assert await ta.nothing()
    await asyncio.sleep(0.6)
    await ta.send({"type": "ping"})
    assert await ta.recv() == {"type": "pong", "head": 0}
    await ta.disconnect()


def test_bad_bound_settings_are_system_check_errors(settings):
    """Bounds that are neither None nor a sane number are refused at start-up."""
    from clients.checks import check_settings as clients_check
    from messaging.checks import check_settings as messaging_check

    assert clients_check() == [] and messaging_check() == []
    settings.CLIENTS_MAX_PER_USER = 0
    settings.MESSAGING_USER_SEND_RATE, settings.MESSAGING_PING_BURST = -1, 0
    settings.MESSAGING_MAX_ROOMS_PER_USER, settings.MESSAGING_TYPING_INTERVAL = "many", 0
    assert [e.id for e in clients_check()] == ["clients.E002"]
    assert sorted(e.id for e in messaging_check()) == [
        "messaging.E003",
        "messaging.E003",
        "messaging.E005",
        "messaging.E006",
    ]
