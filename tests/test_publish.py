"""The server's publish (messaging.publishing): transactional, idempotent, a tab's guarantees."""

import asyncio
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.db import connection, transaction

from clients.errors import Malformed, NotFound
from clients.models import Client
from messaging import apublish, publish
from messaging.checks import check_server_api
from messaging.models import Delivery, Message, Room
from tests.conftest import api_post, connect_tab, http_as, new_client, register

pytestmark = pytest.mark.django_db(transaction=True)

SERVER_FROM = {"user": None, "client_id": None, "server": "orders"}


class Crash(Exception):
    pass


@database_sync_to_async
def counts() -> tuple[int, int]:
    return Message.objects.count(), Delivery.objects.count()


@database_sync_to_async
def http_page(user, client_id: str) -> dict:
    response = http_as(user).get(f"/api/clients/{client_id}/messages")
    assert response.status_code == 200, response.content
    return response.json()


@database_sync_to_async
def make_room(name: str, *members) -> Room:
    room = Room.objects.create(name=name)
    room.members.add(*members)
    return room


async def test_publish_in_a_rolled_back_transaction_delivers_nothing(alice, bob):
    """A publish whose surrounding transaction rolls back stores and pushes nothing."""
    online, offline = await new_client(bob), await new_client(bob)
    tab = await connect_tab(bob, online)

    def business_change_that_fails():
        with transaction.atomic():
            Room.objects.create(name="orders-42")
            publish(alice, {"text": "not for alice"}, key="k-alice")
            publish(bob, {"text": "your order shipped"}, key="order-42", sender="orders")
            raise Crash

    with pytest.raises(Crash):
        await database_sync_to_async(business_change_that_fails)()
    assert await counts() == (0, 0)
    assert await tab.nothing(0.3)
    assert (await http_page(bob, offline))["deliveries"] == []
    # The retry of the task (same key) is a new publish: nothing of the first one was kept.
    result = await database_sync_to_async(publish)(bob, {"text": "again"}, key="order-42")
    assert result.duplicate is False
    assert (await tab.deliveries(1))[0]["message"]["body"] == {"text": "again"}
    await tab.disconnect()


async def test_publish_in_a_committed_transaction_reaches_every_tab_once_after_commit(bob, carol):
    """Inside a committed transaction, every tab of the target gets the message exactly once,
    pushed only once the transaction commits; tabs offline then catch up over HTTP and a later
    socket; the ack deletes it."""
    online, offline, later = [await new_client(bob) for _ in range(3)]
    other = await new_client(carol)
    tab = await connect_tab(bob, online)
    published, commit = threading.Event(), threading.Event()

    def business_change():
        with transaction.atomic():
            Room.objects.create(name="orders-43")
            publish(bob, {"text": "your order shipped"}, key="order-43", sender="orders")
            published.set()
            assert commit.wait(5)

    task = asyncio.ensure_future(database_sync_to_async(business_change)())
    assert await asyncio.to_thread(published.wait, 5)
    assert await tab.nothing(0.3)  # not before the commit
    commit.set()
    await task

    (frame,) = await tab.deliveries(1)
    message = frame["message"]
    assert frame["seq"] == 1
    assert message["from"] == SERVER_FROM
    assert message["to"] == {"user": "bob"} and message["body"] == {"text": "your order shipped"}
    assert await tab.nothing(0.3)  # once

    page = await http_page(bob, offline)
    assert [(d["seq"], d["message"]) for d in page["deliveries"]] == [(1, message)]
    late = await connect_tab(bob, later)
    assert [f["message"]["id"] for f in await late.deliveries(1)] == [message["id"]]
    assert await late.nothing(0.3)
    assert (await http_page(carol, other))["deliveries"] == []

    await tab.send({"type": "ack", "seq": 1})
    for _ in range(50):
        if not await database_sync_to_async(Delivery.objects.filter(client_id=online).exists)():
            break
        await asyncio.sleep(0.05)
    assert await database_sync_to_async(Delivery.objects.count)() == 2  # the other two tabs'
    await tab.disconnect()
    await late.disconnect()


async def test_a_retried_publish_with_the_same_key_stores_one_message(alice, bob, carol):
    """Publishing twice with one key stores one message, delivered once to each member's tab,
    and answers the retry with the stored id."""
    await make_room("lobby", alice, bob)
    a, b, c = await new_client(alice), await new_client(bob), await new_client(carol)
    tab = await connect_tab(bob, b)
    first = await apublish({"room": "lobby"}, {"text": "maintenance at 3"}, key="notice-1")
    again = await apublish("room:lobby", {"text": "maintenance at 3"}, key="notice-1")
    assert not first.duplicate and again.duplicate and again.id == first.id
    assert await counts() == (1, 2)
    (frame,) = await tab.deliveries(1)
    assert frame["message"]["from"] == {"user": None, "client_id": None, "server": "server"}
    assert frame["message"]["to"] == {"room": "lobby"}
    assert await tab.nothing(0.3)
    assert len((await http_page(alice, a))["deliveries"]) == 1
    assert (await http_page(carol, c))["deliveries"] == []
    # The room's history has it, for tabs that resync.
    history = await database_sync_to_async(
        lambda: http_as(alice).get("/api/rooms/lobby/messages").json()
    )()
    assert [m["id"] for m in history["messages"]] == [first.id]
    await tab.disconnect()


async def test_one_key_for_two_targets_is_two_messages(alice, bob):
    """A key names one message to one target: the same key (an order id) for the buyer and for
    the seller stores a message for each, and a retry of either stores nothing new."""
    for_alice = await apublish(alice, {"text": "sold"}, key="order-7")
    for_bob = await apublish(bob, {"text": "bought"}, key="order-7")
    assert not for_alice.duplicate and not for_bob.duplicate and for_alice.id != for_bob.id
    again = await apublish(bob, {"text": "bought"}, key="order-7")
    assert again.duplicate and again.id == for_bob.id


async def test_publish_keeps_the_queue_bound(bob, settings):
    """Past MESSAGING_QUEUE_LIMIT a client gets resync_required, as with a tab's sends."""
    settings.MESSAGING_QUEUE_LIMIT = 2
    client_id = await new_client(bob)
    for i in range(3):
        await apublish(bob, i)
    head, resync = await database_sync_to_async(
        lambda: Client.objects.values_list("head", "resync_required").get(pk=client_id)
    )()
    assert (head, resync) == (2, True)
    assert (await http_page(bob, client_id))["resync_required"] is True


def test_publish_refuses_unknown_targets_and_bad_input(bob):
    """Unknown users and rooms, bad targets, keys and bodies are ServiceErrors; nothing stored."""
    with pytest.raises(NotFound, match="nobody"):
        publish({"user": "nobody"}, 1)
    with pytest.raises(NotFound, match="nowhere"):
        publish("room:nowhere", 1)
    for to in ("bob", "group:x", {"user": "bob", "room": "x"}):
        with pytest.raises(Malformed):
            publish(to, 1)
    with pytest.raises(Malformed):
        publish(bob, float("nan"))
    with pytest.raises(Malformed):
        publish(bob, 1, key="")
    assert Message.objects.count() == 0


async def test_tabs_sends_are_unchanged_beside_server_messages(alice, bob):
    """A tab's send still reaches the sender's tabs and is deduplicated by its client_msg_id."""
    a, b = await new_client(alice), await new_client(bob)
    await apublish(bob, "from the server", key="m1")
    http = await database_sync_to_async(http_as)(alice)
    payload = {"client_id": a, "client_msg_id": "m1", "to": {"user": "bob"}, "body": "hi"}
    response = await database_sync_to_async(api_post)(http, "/api/messages/", payload)
    assert response.status_code == 201
    page = await http_page(bob, b)
    assert [d["message"]["body"] for d in page["deliveries"]] == ["from the server", "hi"]
    assert page["deliveries"][1]["message"]["from"] == {"user": "alice", "client_id": a}


TOKEN = "t" * 40


def server_post(payload, token: str | None = TOKEN, **extra):
    headers = {} if token is None else {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    return api_post(http_as(None, csrf=True), "/api/server/publish", payload, **headers, **extra)


def test_server_api_is_off_without_a_token(bob, settings):
    """Unset MESSAGING_SERVER_API_TOKEN: the endpoint answers 404, whatever the caller sends."""
    settings.MESSAGING_SERVER_API_TOKEN = None
    response = server_post({"to": {"user": "bob"}, "body": 1})
    assert response.status_code == 404
    assert Message.objects.count() == 0


def test_server_api_refuses_a_missing_or_wrong_token(bob, settings):
    """401 with the error shape and a Bearer challenge: no token, a wrong one, another scheme."""
    settings.MESSAGING_SERVER_API_TOKEN = TOKEN
    payload = {"to": {"user": "bob"}, "body": 1}
    for response in (
        server_post(payload, token=None),
        server_post(payload, token="t" * 39 + "u"),
        server_post(payload, token=""),
        server_post(payload, token=None, HTTP_AUTHORIZATION=f"Basic {TOKEN}"),
    ):
        assert response.status_code == 401, response.content
        assert response.json()["error"]["code"] == "not_authenticated"
        assert response["WWW-Authenticate"].startswith("Bearer")
    assert Message.objects.count() == 0


def test_server_api_publishes_with_the_right_token(bob, settings):
    """The right token (no session, no CSRF token) publishes: 201, then 200 duplicate for a retry
    of its key; bad input gets the API's usual 400/404/405/413 errors."""
    settings.MESSAGING_SERVER_API_TOKEN = TOKEN
    client_id = register(http_as(bob))
    payload = {"to": {"user": "bob"}, "body": {"text": "hi"}, "key": "k1", "sender": "billing"}
    first = server_post(payload)
    assert first.status_code == 201, first.content
    again = server_post(payload)
    assert again.status_code == 200 and again.json() == {
        "id": first.json()["id"],
        "duplicate": True,
    }
    (delivery,) = http_as(bob).get(f"/api/clients/{client_id}/messages").json()["deliveries"]
    assert delivery["message"]["from"] == {"user": None, "client_id": None, "server": "billing"}

    def status(payload, **extra):
        response = server_post(payload, **extra)
        return response.status_code, response.json()["error"]["code"]

    assert status({"to": {"user": "nobody"}, "body": 1}) == (404, "unknown_user")
    assert status({"to": {"room": "nowhere"}, "body": 1}) == (404, "unknown_room")
    assert status({"to": "user:bob", "body": 1}) == (400, "invalid_to")
    assert status({"to": {"user": "bob"}}) == (400, "invalid_body")
    assert status({"to": {"user": "bob"}, "body": 1, "key": 5}) == (400, "invalid_key")
    assert status([1]) == (400, "malformed")
    settings.MESSAGING_MAX_BODY_BYTES = 100
    big = {"to": {"user": "bob"}, "body": "x" * 101}
    assert status(big)[0] == 413
    response = http_as(None).get("/api/server/publish", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 405
    assert Message.objects.count() == 1


# -- the command and the admin action ---------------------------------------------------------


def test_publish_command_publishes_and_refuses_bad_input(bob):
    """manage.py publish prints the id, stores once per key, and refuses unknown targets and bad
    JSON with a clear message and a non-zero exit status."""
    client_id = register(http_as(bob))
    out = io.StringIO()
    call_command(
        "publish", "--to", "user:bob", "--body", '{"text": "hi"}', "--key", "c1", stdout=out
    )
    message = Message.objects.get()
    assert out.getvalue().strip() == f"published message {message.id}"
    out = io.StringIO()
    call_command("publish", "--to", "user:bob", "--body", "1", "--key", "c1", stdout=out)
    assert "already published" in out.getvalue() and Message.objects.count() == 1
    (delivery,) = http_as(bob).get(f"/api/clients/{client_id}/messages").json()["deliveries"]
    assert delivery["message"]["from"]["server"] == "server"

    def refused(*args: str) -> tuple[int, str]:
        with pytest.raises(CommandError) as info:
            call_command("publish", *args)
        return info.value.returncode, str(info.value)

    assert refused("--to", "user:nobody", "--body", "1") == (2, "no user named 'nobody'")
    assert refused("--to", "room:nowhere", "--body", "1") == (2, "no room named 'nowhere'")
    code, text = refused("--to", "bob", "--body", "1")
    assert code == 1 and "user:NAME or room:NAME" in text
    code, text = refused("--to", "user:bob", "--body", "{bad")
    assert code == 1 and "--body is not valid JSON" in text
    assert Message.objects.count() == 1


def test_publish_command_exit_status_and_help():
    """Run as a program: --help documents the exit codes; bad JSON exits 1 with stderr."""
    env = {**os.environ, "DJANGO_SECRET_KEY": "test-only", "DJANGO_DEBUG": "1"}
    run = [sys.executable, str(Path(__file__).parents[1] / "manage.py"), "publish"]
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert helped.returncode == 0 and "--to TARGET" in helped.stdout
    assert "Exit status" in helped.stdout
    bad = subprocess.run(
        [*run, "--to", "user:bob", "--body", "{bad"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode == 1, bad.stderr
    assert "CommandError: --body is not valid JSON" in bad.stderr


@pytest.fixture
def staff(db):
    user = get_user_model().objects.create_user("staff", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_user", "change_user", "view_room"])
    )
    return user


def action_post(http, url: str, pks, **fields):
    data = {"action": "send_message", "_selected_action": [str(pk) for pk in pks], **fields}
    return http.post(url, data)


def test_admin_action_sends_to_users_and_rooms_once(alice, bob, carol):
    """A superuser picks users (or a room), composes, and each target's tabs get the message;
    a second submit of the same page sends nothing new; bad JSON is refused on the page."""
    root = get_user_model().objects.create_superuser("root", password="pw")
    http = http_as(root)
    clients = {u.username: register(http_as(u)) for u in (alice, bob, carol)}
    url = "/admin/auth/user/"
    assert "Send a message…" in http.get(url).content.decode()

    page = action_post(http, url, [alice.pk, bob.pk])
    assert page.status_code == 200 and b'name="text"' in page.content
    key = page.context["form"]["key"].value()
    fields = {"post": "yes", "text": "Back at 3", "sender": "ops", "key": key}
    for _ in range(2):
        done = action_post(http, url, [alice.pk, bob.pk], **fields)
        assert done.status_code == 302, done.content
    assert Message.objects.count() == 2
    for name in ("alice", "bob"):
        user = get_user_model().objects.get(username=name)
        (d,) = http_as(user).get(f"/api/clients/{clients[name]}/messages").json()["deliveries"]
        assert d["message"]["body"] == {"text": "Back at 3"}
        assert d["message"]["from"] == {"user": None, "client_id": None, "server": "ops"}

    bad = action_post(
        http, url, [carol.pk], post="yes", text="{bad", as_json="on", sender="x", key="k"
    )
    assert bad.status_code == 200 and b"not valid JSON" in bad.content

    room = Room.objects.create(name="lobby")
    room.members.add(carol)
    rooms = "/admin/messaging/room/"
    fields = {"post": "yes", "text": '{"n": 1}', "as_json": "on", "sender": "ops", "key": "r1"}
    assert action_post(http, rooms, [room.pk], **fields).status_code == 302
    (d,) = http_as(carol).get(f"/api/clients/{clients['carol']}/messages").json()["deliveries"]
    assert d["message"]["body"] == {"n": 1} and d["message"]["to"] == {"room": "lobby"}
    assert Message.objects.count() == 3


def test_admin_action_needs_the_publish_permission(bob, staff):
    """Staff without messaging.publish_message are not offered the action, and posting it sends
    nothing; with the permission they are offered it."""
    http = http_as(staff)
    url = "/admin/auth/user/"
    assert "Send a message…" not in http.get(url).content.decode()
    fields = {"post": "yes", "text": "hi", "sender": "ops", "key": "k"}
    response = action_post(http, url, [bob.pk], **fields)
    assert response.status_code in (200, 302)
    assert Message.objects.count() == 0
    staff.user_permissions.add(Permission.objects.get(codename="publish_message"))
    staff = get_user_model().objects.get(pk=staff.pk)  # no cached permissions
    http = http_as(staff)
    assert "Send a message…" in http.get(url).content.decode()
    assert action_post(http, url, [bob.pk], **fields).status_code == 302
    assert Message.objects.count() == 1


async def test_notices_history_has_the_users_server_messages_past_a_full_queue(
    alice, bob, settings
):
    """Server messages to a user past the queue bound are in GET /api/notices/, the caller's
    only, newest last, paged by before; room publishes and tabs' messages are not."""
    settings.MESSAGING_QUEUE_LIMIT = 2
    await new_client(bob)
    await make_room("lobby", bob)
    ids = [(await apublish(bob, n)).id for n in range(4)]
    await apublish(alice, "alice's")
    await apublish("room:lobby", "room")

    def notices(user, query=""):
        response = http_as(user).get(f"/api/notices/{query}")
        assert response.status_code == 200, response.content
        return response.json()["messages"]

    got = await database_sync_to_async(notices)(bob)
    assert [m["id"] for m in got] == ids and [m["body"] for m in got] == [0, 1, 2, 3]
    assert all(m["from"]["server"] == "server" for m in got)
    older = await database_sync_to_async(notices)(bob, f"?before={ids[2]}&limit=1")
    assert [m["id"] for m in older] == [ids[1]]
    assert [m["body"] for m in await database_sync_to_async(notices)(alice)] == ["alice's"]
    anonymous = await database_sync_to_async(lambda: http_as(None).get("/api/notices/"))()
    assert anonymous.status_code == 401
    # They are no direct conversation (with nobody).
    direct = await database_sync_to_async(lambda: http_as(bob).get("/api/direct/").json())()
    assert direct == {"conversations": []}


def test_a_short_or_non_text_server_token_is_a_system_check_error(settings):
    """MESSAGING_SERVER_API_TOKEN must be None or 32+ characters of text (messaging.E008)."""
    for bad in ("short", 12345678901234567890123456789012345):
        settings.MESSAGING_SERVER_API_TOKEN = bad
        assert "messaging.E008" in [e.id for e in check_server_api()]
    settings.MESSAGING_SERVER_API_TOKEN = "x" * 32
    assert "messaging.E008" not in [e.id for e in check_server_api()]


async def test_publish_in_a_transaction_does_not_wait_for_a_batch_waiting_for_it(alice, bob):
    """On SQLite the caller's transaction holds the write lock; a tab's send batch that waits
    for it must not hold anything the publish inside that transaction needs (no deadlock until
    the busy timeout)."""
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's single writer only")
    a, b = await new_client(alice), await new_client(bob)
    tab = await connect_tab(alice, a)
    holding, publish_now = threading.Event(), threading.Event()

    def business_change():
        with transaction.atomic():
            Room.objects.create(name="orders-44")  # the write lock is this transaction's now
            holding.set()
            assert publish_now.wait(5)
            publish(bob, "shipped", key="order-44")

    task = asyncio.ensure_future(database_sync_to_async(business_change)())
    assert await asyncio.to_thread(holding.wait, 5)
    await tab.send({"type": "send", "client_msg_id": "m1", "to": {"user": "bob"}, "body": "hi"})
    await asyncio.sleep(0.3)  # the send batch is waiting for the database now
    publish_now.set()
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(task, 10)
    assert (await tab.recv_type("sent", timeout=10))["duplicate"] is False
    assert asyncio.get_running_loop().time() - started < 5
    page = await http_page(bob, b)
    assert sorted(d["message"]["body"] for d in page["deliveries"]) == ["hi", "shipped"]
    await tab.disconnect()
