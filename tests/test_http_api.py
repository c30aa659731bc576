"""The HTTP half of the protocol: every endpoint's answer, every error, delivery with no socket."""

import json
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest
from django.utils.crypto import get_random_string

from clients.cleanup import cleanup_clients
from clients.models import Client
from messaging.models import Delivery, Message, Room
from messaging.wire import message_tail
from tests.conftest import api_post, http_as, make_user, register

pytestmark = pytest.mark.django_db

JSON = "application/json"
MAX_INT = 2**63 - 1


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """
    Every test creates users; no password is ever checked here, so hash them cheaply.
    """
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


# -- helpers -----------------------------------------------------------------------------------


def error_of(response, status: int, code: str | None = None) -> dict:
    """
    Assert the protocol's error answer: `status`, a JSON body of exactly {"error": {code, detail}}.
    """
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response["Content-Type"].startswith(JSON), response["Content-Type"]
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"code", "detail"}, error
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["detail"], str) and error["detail"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def raw_post(client, path: str, data: str | bytes, content_type: str = JSON, **extra):
    """
    POST `data` exactly as given (no JSON encoding by the test).
    """
    return client.generic("POST", path, data, content_type=content_type, **extra)


def envelope_text(cid: str, body_text: str, *, cmid: str = "m", padding: str = "") -> str:
    """
    A send request to bob as JSON text, with the body spelled exactly as `body_text`.
    """
    head = f'{{"client_id": "{cid}", "client_msg_id": "{cmid}", "to": {{"user": "bob"}},'
    return f'{head}{padding} "body": {body_text}}}'


def send(client, cid: str, cmid: str, to: dict, body=None):
    payload = {"client_id": cid, "client_msg_id": cmid, "to": to, "body": body}
    return api_post(client, "/api/messages/", payload)


def sent_id(response, status: int = 201) -> int:
    assert response.status_code == status, response.content
    data = response.json()
    assert data == {"id": data["id"], "duplicate": status == 200}
    assert isinstance(data["id"], int)
    return data["id"]


def get_messages(client, cid: str, **params):
    return client.get(f"/api/clients/{cid}/messages", params)


def page(client, cid: str, **params) -> dict:
    response = get_messages(client, cid, **params)
    assert response.status_code == 200, response.content
    data = response.json()
    assert set(data) == {"deliveries", "head"}, data
    return data


def ack(client, cid: str, seq):
    return api_post(client, f"/api/clients/{cid}/ack", {"seq": seq})


def seqs(data: dict) -> list[int]:
    return [d["seq"] for d in data["deliveries"]]


def create_room(client, name: str) -> dict:
    response = api_post(client, "/api/rooms/", {"name": name})
    assert response.status_code == 201, response.content
    return response.json()


def join(client, name: str) -> dict:
    response = api_post(client, f"/api/rooms/{quote(name)}/join")
    assert response.status_code == 200, response.content
    return response.json()


def history(client, name: str, **params):
    return client.get(f"/api/rooms/{quote(name)}/messages", params)


def with_csrf_cookie(client) -> str:
    """
    Give a CSRF-enforcing test client a CSRF cookie (as a page load would) and return the token.
    """
    token = get_random_string(32)
    client.cookies["csrftoken"] = token
    return token


def call(client, method: str, path: str, payload=None, **extra):
    if method == "get":
        return client.get(path, **extra)
    if method == "delete":
        return client.delete(path, **extra)
    return api_post(client, path, payload, **extra)


def fill_queue(user, cid: str, count: int) -> list[int]:
    """
    Put `count` deliveries (one message each) in the queue of `cid` directly; return message ids.
    """
    now = datetime.now(UTC)
    tail = message_tail(
        sender=user.username, client_id=cid, to={"user": user.username}, body_json="0", created=now
    )
    Message.objects.bulk_create(
        Message(
            sender=user,
            sender_client=uuid.UUID(cid),
            client_msg_id=f"bulk-{i}",
            to_user=user,
            created_at=now,
            wire=tail,
        )
        for i in range(count)
    )
    ids = list(
        Message.objects.filter(client_msg_id__startswith="bulk-")
        .order_by("id")
        .values_list("id", flat=True)
    )
    Delivery.objects.bulk_create(
        Delivery(client_id=cid, seq=i + 1, message_id=mid) for i, mid in enumerate(ids)
    )
    Client.objects.filter(pk=cid).update(head=count)
    return ids


# -- POST /api/clients/, DELETE /api/clients/{id}/, POST /api/clients/{id}/close -------------


def test_register_client_answers_201_with_new_uuid4_and_head_0(alice):
    """POST /api/clients/ is 201 {"client_id", "head": 0}, a fresh UUID4 of the caller each time."""
    http = http_as(alice)
    first = api_post(http, "/api/clients/")
    second = api_post(http, "/api/clients/")
    for response in (first, second):
        assert response.status_code == 201
        assert response["Content-Type"].startswith(JSON)
        assert set(response.json()) == {"client_id", "head"}
        assert response.json()["head"] == 0
        assert uuid.UUID(response.json()["client_id"]).version == 4
    ids = {first.json()["client_id"], second.json()["client_id"]}
    assert len(ids) == 2
    assert set(Client.objects.filter(user=alice).values_list("id", flat=True)) == {
        uuid.UUID(i) for i in ids
    }


def test_delete_client_answers_204_and_drops_client_and_queue_at_once(alice, bob):
    """DELETE /api/clients/{id}/ is 204 with no body; the client and its deliveries are gone."""
    ha, hb = http_as(alice), http_as(bob)
    doomed, kept, b1 = register(ha), register(ha), register(hb)
    mid = sent_id(send(hb, b1, "m1", {"user": "alice"}, "hi"))
    assert Delivery.objects.filter(client_id=doomed).count() == 1

    response = ha.delete(f"/api/clients/{doomed}/")
    assert response.status_code == 204
    assert response.content == b""
    assert not Client.objects.filter(pk=doomed).exists()
    assert not Delivery.objects.filter(client_id=doomed).exists()
    # Other tabs keep their queues, and the history keeps the message.
    assert seqs(page(ha, kept)) == [1]
    assert Message.objects.filter(pk=mid).exists()
    error_of(get_messages(ha, doomed), 404, "unknown_client")
    error_of(ha.delete(f"/api/clients/{doomed}/"), 404, "unknown_client")


def test_close_answers_204_and_client_is_deleted_after_the_grace_period(alice, settings):
    """POST close is 204; the client lives through the grace period, then cleanup deletes it."""
    settings.CLIENTS_CLOSE_GRACE = 30
    http = http_as(alice)
    cid, other = register(http), register(http)
    response = api_post(http, f"/api/clients/{cid}/close")
    assert response.status_code == 204
    assert response.content == b""
    row = Client.objects.get(pk=cid)
    assert row.closing_at is not None
    # Still usable within the grace period (a reload comes back to it).
    assert page(http, cid)["head"] == 0
    assert cleanup_clients(now=row.closing_at + timedelta(seconds=10)).total == 0
    assert Client.objects.filter(pk=cid).exists()
    result = cleanup_clients(now=row.closing_at + timedelta(seconds=31))
    assert result.closed == [uuid.UUID(cid)]
    assert not Client.objects.filter(pk=cid).exists()
    assert Client.objects.filter(pk=other).exists()


@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
def test_close_accepts_a_sendbeacon_form_body_carrying_the_csrf_token(alice, encoding):
    """A beacon's form body with csrfmiddlewaretoken passes CSRF enforcement: 204."""
    http = http_as(alice, csrf=True)
    cid = register(http_as(alice))
    token = with_csrf_cookie(http)
    if encoding == "urlencoded":
        response = raw_post(
            http,
            f"/api/clients/{cid}/close",
            f"csrfmiddlewaretoken={token}",
            content_type="application/x-www-form-urlencoded",
        )
    else:
        response = http.post(f"/api/clients/{cid}/close", {"csrfmiddlewaretoken": token})
    assert response.status_code == 204, response.content
    assert Client.objects.get(pk=cid).closing_at is not None


def test_close_beacon_without_or_with_a_wrong_token_is_refused(alice):
    """A form-encoded close without a valid CSRF token is a JSON 403 csrf_failed; no change."""
    http = http_as(alice, csrf=True)
    cid = register(http_as(alice))
    with_csrf_cookie(http)
    for data in ("", "csrfmiddlewaretoken=" + get_random_string(32)):
        response = raw_post(
            http, f"/api/clients/{cid}/close", data, "application/x-www-form-urlencoded"
        )
        error_of(response, 403, "csrf_failed")
    assert Client.objects.get(pk=cid).closing_at is None


# -- GET /api/clients/{id}/messages ------------------------------------------------------------


def test_messages_lists_unacked_deliveries_after_n_in_seq_order_with_head(alice, bob):
    """GET messages: deliveries {"seq", "message"} with seq > after, in seq order, and head."""
    ha, hb = http_as(alice), http_as(bob)
    a1, b1 = register(ha), register(hb)
    ids = [sent_id(send(hb, b1, f"m{i}", {"user": "alice"}, {"n": i})) for i in range(5)]

    data = page(ha, a1)
    assert seqs(data) == [1, 2, 3, 4, 5]
    assert data["head"] == 5
    assert [d["message"]["id"] for d in data["deliveries"]] == ids
    for d in data["deliveries"]:
        assert set(d) == {"seq", "message"}

    data = page(ha, a1, after=2)
    assert seqs(data) == [3, 4, 5]
    assert data["head"] == 5
    assert [d["message"]["body"] for d in data["deliveries"]] == [{"n": 2}, {"n": 3}, {"n": 4}]

    data = page(ha, a1, after=2, limit=2)
    assert seqs(data) == [3, 4]
    assert data["head"] == 5

    assert page(ha, a1, after=5) == {"deliveries": [], "head": 5}
    assert page(ha, a1, after=MAX_INT) == {"deliveries": [], "head": 5}


def test_message_object_has_exactly_the_protocol_fields(alice, bob):
    """A delivered message is {"id", "from": {"user", "client_id"}, "to", "body", "created"}."""
    ha, hb = http_as(alice), http_as(bob)
    a1, b1 = register(ha), register(hb)
    before = datetime.now(UTC)
    mid = sent_id(send(ha, a1, "x", {"user": "bob"}, {"text": "hi", "n": [1, 2.5, None, True]}))
    after = datetime.now(UTC)
    for http, cid in ((ha, a1), (hb, b1)):
        (delivery,) = page(http, cid)["deliveries"]
        message = delivery["message"]
        assert set(message) == {"id", "from", "to", "body", "created"}
        assert message["id"] == mid
        assert message["from"] == {"user": "alice", "client_id": a1}
        assert message["to"] == {"user": "bob"}
        assert message["body"] == {"text": "hi", "n": [1, 2.5, None, True]}
        assert message["created"].endswith("Z")
        created = datetime.fromisoformat(message["created"])
        assert created.utcoffset() == timedelta(0)
        assert before - timedelta(seconds=1) <= created <= after + timedelta(seconds=1)


def test_messages_limit_defaults_to_100_and_is_capped_at_1000(alice):
    """limit defaults to 100 and any larger limit is cut to 1,000 (head still the real head)."""
    http = http_as(alice)
    cid = register(http)
    ids = fill_queue(alice, cid, 1005)

    data = page(http, cid)
    assert seqs(data) == list(range(1, 101))
    assert data["head"] == 1005
    assert [d["message"]["id"] for d in data["deliveries"]] == ids[:100]

    assert seqs(page(http, cid, limit=1000)) == list(range(1, 1001))
    assert seqs(page(http, cid, limit=1001)) == list(range(1, 1001))
    assert seqs(page(http, cid, limit=99999)) == list(range(1, 1001))
    assert seqs(page(http, cid, after=1000, limit=99999)) == list(range(1001, 1006))
    assert seqs(page(http, cid, limit=1)) == [1]


# -- POST /api/clients/{id}/ack ----------------------------------------------------------------


def test_ack_is_cumulative_and_idempotent(alice, bob):
    """POST ack {"seq": N} is 200 {"acked": N}: deletes this client's seq <= N; again, a no-op."""
    ha, hb = http_as(alice), http_as(bob)
    a1, a2, b1 = register(ha), register(ha), register(hb)
    for i in range(5):
        sent_id(send(hb, b1, f"m{i}", {"user": "alice"}, i))

    response = ack(ha, a1, 3)
    assert response.status_code == 200
    assert response.json() == {"acked": 3}
    assert seqs(page(ha, a1)) == [4, 5]
    assert page(ha, a1)["head"] == 5
    # Idempotent: the same ack again, and an older one, change nothing.
    assert ack(ha, a1, 3).json() == {"acked": 3}
    assert ack(ha, a1, 1).status_code == 200
    assert seqs(page(ha, a1)) == [4, 5]
    # Other clients (same user, or the sender) are untouched.
    assert seqs(page(ha, a2)) == [1, 2, 3, 4, 5]
    assert seqs(page(hb, b1)) == [1, 2, 3, 4, 5]
    assert ack(ha, a1, 5).json() == {"acked": 5}
    assert page(ha, a1) == {"deliveries": [], "head": 5}
    assert not Delivery.objects.filter(client_id=a1).exists()


def test_ack_above_head_counts_as_ack_of_head(alice, bob):
    """An ack above head answers {"acked": head}, and later deliveries are not pre-acked."""
    ha, hb = http_as(alice), http_as(bob)
    a1, b1 = register(ha), register(hb)
    assert ack(ha, a1, 10).json() == {"acked": 0}
    sent_id(send(hb, b1, "m1", {"user": "alice"}, 1))
    sent_id(send(hb, b1, "m2", {"user": "alice"}, 2))
    assert ack(ha, a1, MAX_INT).json() == {"acked": 2}
    assert page(ha, a1) == {"deliveries": [], "head": 2}
    sent_id(send(hb, b1, "m3", {"user": "alice"}, 3))
    data = page(ha, a1)
    assert seqs(data) == [3]
    assert data["head"] == 3


# -- POST /api/messages/ -----------------------------------------------------------------------


def test_send_is_201_then_a_retry_is_200_duplicate_and_stores_nothing(alice, bob):
    """A send is 201 {"id", "duplicate": false}; the same client_msg_id again is 200, same id."""
    ha, hb = http_as(alice), http_as(bob)
    a1, a2, b1 = register(ha), register(ha), register(hb)
    response = send(ha, a1, "retry-me", {"user": "bob"}, {"v": 1})
    assert response.status_code == 201
    first = response.json()
    assert first == {"id": first["id"], "duplicate": False}

    for body in ({"v": 1}, {"v": "changed"}):
        again = send(ha, a1, "retry-me", {"user": "bob"}, body)
        assert again.status_code == 200
        assert again.json() == {"id": first["id"], "duplicate": True}
    assert Message.objects.count() == 1
    assert Delivery.objects.count() == 3
    assert page(hb, b1)["head"] == 1
    assert page(ha, a1)["head"] == 1
    assert page(hb, b1)["deliveries"][0]["message"]["body"] == {"v": 1}
    # client_msg_id is unique per client: another tab may reuse it for a new message.
    other = sent_id(send(ha, a2, "retry-me", {"user": "bob"}, {"v": 2}))
    assert other != first["id"]
    assert page(hb, b1)["head"] == 2


def test_send_targets_every_tab_of_recipient_and_sender_once(alice, bob, carol):
    """A direct message gets one delivery in each tab of sender and recipient, none elsewhere."""
    ha, hb, hc = http_as(alice), http_as(bob), http_as(carol)
    a1, a2, b1, b2, c1 = register(ha), register(ha), register(hb), register(hb), register(hc)
    mid = sent_id(send(ha, a1, "m", {"user": "bob"}, "hello"))
    for http, cid in ((ha, a1), (ha, a2), (hb, b1), (hb, b2)):
        data = page(http, cid)
        assert seqs(data) == [1]
        assert data["deliveries"][0]["message"]["id"] == mid
    assert page(hc, c1) == {"deliveries": [], "head": 0}


def test_send_to_self_is_delivered_once_per_tab(alice):
    """A message to oneself is one delivery per tab, not two."""
    http = http_as(alice)
    a1, a2 = register(http), register(http)
    sent_id(send(http, a1, "self", {"user": "alice"}, "note"))
    assert seqs(page(http, a1)) == [1]
    assert seqs(page(http, a2)) == [1]


# -- rooms -------------------------------------------------------------------------------------


def test_create_room_is_201_with_creator_as_member_and_409_when_taken(alice, bob):
    """POST /api/rooms/ is 201 {"name", "members": [creator]}; a taken name is 409 for anyone."""
    ha, hb = http_as(alice), http_as(bob)
    response = api_post(ha, "/api/rooms/", {"name": "general"})
    assert response.status_code == 201
    assert response.json() == {"name": "general", "members": ["alice"]}
    for http in (ha, hb):
        error_of(api_post(http, "/api/rooms/", {"name": "general"}), 409, "room_exists")
    room = Room.objects.get(name="general")
    assert list(room.members.values_list("username", flat=True)) == ["alice"]
    assert Room.objects.count() == 1


def test_join_and_leave_answer_200_with_members_and_are_harmless_twice(alice, bob, carol):
    """join/leave are 200 {"name", "members"}; repeating either changes nothing."""
    ha, hb, hc = http_as(alice), http_as(bob), http_as(carol)
    create_room(ha, "lobby")
    for _ in range(2):
        data = join(hb, "lobby")
        assert data == {"name": "lobby", "members": data["members"]}
        assert sorted(data["members"]) == ["alice", "bob"]
    assert sorted(join(hc, "lobby")["members"]) == ["alice", "bob", "carol"]
    for _ in range(2):
        response = api_post(hb, "/api/rooms/lobby/leave")
        assert response.status_code == 200
        data = response.json()
        assert set(data) == {"name", "members"} and data["name"] == "lobby"
        assert sorted(data["members"]) == ["alice", "carol"]
    # Leaving a room one never joined is harmless too.
    response = api_post(hb, "/api/rooms/lobby/leave")
    assert response.status_code == 200


def test_list_rooms_shows_only_the_callers_rooms(alice, bob, carol):
    """GET /api/rooms/ is 200 {"rooms": [{"name", "members"}]} with only the caller's rooms."""
    ha, hb, hc = http_as(alice), http_as(bob), http_as(carol)
    create_room(ha, "a-only")
    create_room(hb, "b-only")
    create_room(ha, "shared")
    join(hb, "shared")
    create_room(hc, "left")
    join(ha, "left")
    api_post(ha, "/api/rooms/left/leave")

    def rooms(http) -> dict:
        response = http.get("/api/rooms/")
        assert response.status_code == 200
        data = response.json()
        assert list(data) == ["rooms"]
        for room in data["rooms"]:
            assert set(room) == {"name", "members"}
        return {r["name"]: sorted(r["members"]) for r in data["rooms"]}

    assert rooms(ha) == {"a-only": ["alice"], "shared": ["alice", "bob"]}
    assert rooms(hb) == {"b-only": ["bob"], "shared": ["alice", "bob"]}
    assert rooms(hc) == {"left": ["carol"]}
    assert rooms(http_as(make_user("dave"))) == {}


def test_room_history_is_newest_last_and_pages_with_before_and_limit(alice, bob):
    """GET room messages: members get history oldest to newest; before=ID and limit page back."""
    ha, hb = http_as(alice), http_as(bob)
    a1, b1 = register(ha), register(hb)
    create_room(ha, "hist")
    join(hb, "hist")
    ids = []
    for i in range(7):
        http, cid = (ha, a1) if i % 2 == 0 else (hb, b1)
        ids.append(sent_id(send(http, cid, f"h{i}", {"room": "hist"}, {"i": i})))
    # A direct message is not part of the room's history.
    sent_id(send(ha, a1, "dm", {"user": "bob"}, "private"))

    def hist(**params) -> list[dict]:
        response = history(hb, "hist", **params)
        assert response.status_code == 200, response.content
        assert list(response.json()) == ["messages"]
        return response.json()["messages"]

    everything = hist()
    assert [m["id"] for m in everything] == ids
    first = everything[0]
    assert set(first) == {"id", "from", "to", "body", "created"}
    assert first["from"] == {"user": "alice", "client_id": a1}
    assert first["to"] == {"room": "hist"}
    assert first["body"] == {"i": 0}
    assert [m["id"] for m in hist(limit=3)] == ids[-3:]
    assert [m["id"] for m in hist(before=ids[-3], limit=3)] == ids[1:4]
    assert [m["id"] for m in hist(before=ids[1], limit=3)] == ids[:1]
    assert [m["id"] for m in hist(before=ids[0])] == []
    assert [m["id"] for m in hist(before=0)] == []
    assert [m["id"] for m in hist(before=MAX_INT)] == ids


def test_room_history_limit_defaults_to_100_and_is_capped_at_1000(alice):
    """Room history pages hold 100 messages by default and never more than 1,000."""
    http = http_as(alice)
    create_room(http, "big")
    room = Room.objects.get(name="big")
    cid = str(uuid.uuid4())
    now = datetime.now(UTC)
    tail = message_tail(
        sender="alice", client_id=cid, to={"room": "big"}, body_json="0", created=now
    )
    Message.objects.bulk_create(
        Message(
            sender=alice, sender_client=uuid.UUID(cid), client_msg_id=f"b{i}", room=room, wire=tail
        )
        for i in range(1003)
    )
    ids = list(Message.objects.filter(room=room).order_by("id").values_list("id", flat=True))
    got = history(http, "big").json()["messages"]
    assert [m["id"] for m in got] == ids[-100:]
    got = history(http, "big", limit=5000).json()["messages"]
    assert [m["id"] for m in got] == ids[-1000:]


def test_non_members_can_neither_read_nor_post_nor_receive(alice, bob, carol):
    """403 not_a_member for reading or posting in a room one is not in (or has left)."""
    ha, hb, hc = http_as(alice), http_as(bob), http_as(carol)
    a1, b1, c1 = register(ha), register(hb), register(hc)
    create_room(ha, "club")
    join(hb, "club")
    sent_id(send(ha, a1, "m1", {"room": "club"}, "members only"))

    error_of(history(hc, "club"), 403, "not_a_member")
    error_of(send(hc, c1, "c1", {"room": "club"}, "let me in"), 403, "not_a_member")
    assert Message.objects.count() == 1
    assert page(hc, c1)["head"] == 0

    assert api_post(hb, "/api/rooms/club/leave").status_code == 200
    error_of(history(hb, "club"), 403, "not_a_member")
    error_of(send(hb, b1, "b1", {"room": "club"}, "still here?"), 403, "not_a_member")
    sent_id(send(ha, a1, "m2", {"room": "club"}, "after bob left"))
    assert page(hb, b1)["head"] == 1  # only the message from before he left
    # Joining (rooms are open) gives read and post rights, and the history from before.
    join(hc, "club")
    assert len(history(hc, "club").json()["messages"]) == 2
    sent_id(send(hc, c1, "c2", {"room": "club"}, "hi"))
    assert page(hc, c1)["head"] == 1


# -- delivery rule 4: HTTP only ----------------------------------------------------------------


def test_http_only_client_gets_every_message_once_in_order(alice, bob, carol):
    """Rule 4: a client that never opens a WebSocket gets every message once, in order, by HTTP."""
    ha, hb, hc = http_as(alice), http_as(bob), http_as(carol)
    quiet = register(ha)  # never connects: HTTP only
    a2, b1, c1 = register(ha), register(hb), register(hc)
    create_room(hb, "team")
    join(ha, "team")
    join(hc, "team")

    plan = [
        (hb, b1, {"user": "alice"}),
        (hc, c1, {"room": "team"}),
        (ha, a2, {"user": "bob"}),  # alice's other tab: the sender's tabs get it too
        (ha, quiet, {"room": "team"}),  # its own message
        (hc, c1, {"user": "bob"}),  # not for alice at all
        (hb, b1, {"room": "team"}),
        (hc, c1, {"user": "alice"}),
    ]
    expected = []
    for round_ in range(4):
        for i, (http, cid, to) in enumerate(plan):
            cmid = f"r{round_}-{i}"
            body = {"round": round_, "i": i, "text": "héllo ✓"}
            mid = sent_id(send(http, cid, cmid, to, body))
            # A retry (the tab did not see the answer) must not deliver anything twice.
            assert sent_id(send(http, cid, cmid, to, body), status=200) == mid
            if not (http is hc and to == {"user": "bob"}):
                expected.append(mid)

    seen: list[dict] = []
    after = 0
    pages = 0
    while True:
        data = page(ha, quiet, after=after, limit=3)
        if not data["deliveries"]:
            break
        pages += 1
        assert len(data["deliveries"]) <= 3
        seen.extend(data["deliveries"])
        after = data["deliveries"][-1]["seq"]
        if pages == 2:
            # Acking part way (cumulative) does not disturb the pages still to come.
            assert ack(ha, quiet, after).json() == {"acked": after}
    assert pages == -(-len(expected) // 3)
    assert [d["seq"] for d in seen] == list(range(1, len(expected) + 1))
    assert [d["message"]["id"] for d in seen] == expected
    assert len({d["message"]["id"] for d in seen}) == len(seen)
    assert data["head"] == len(expected)
    # Unacked deliveries stay; acked ones are gone.
    assert seqs(page(ha, quiet, limit=1000)) == list(range(7, len(expected) + 1))
    assert ack(ha, quiet, len(expected)).json() == {"acked": len(expected)}
    assert page(ha, quiet) == {"deliveries": [], "head": len(expected)}

    # The room's messages come in one order for every member's client, as in the history.
    room_history = [m["id"] for m in history(hc, "team", limit=1000).json()["messages"]]
    room_ids = set(room_history)
    for http, cid in ((hb, b1), (hc, c1), (ha, a2)):
        got = [d["message"]["id"] for d in page(http, cid, limit=1000)["deliveries"]]
        assert len(got) == len(set(got))
        assert [m for m in got if m in room_ids] == room_history
    assert [d["message"]["id"] for d in seen if d["message"]["id"] in room_ids] == room_history


# -- 400 ---------------------------------------------------------------------------------------


JSON_BODY_ENDPOINTS = ["/api/clients/{cid}/ack", "/api/messages/", "/api/rooms/"]


@pytest.mark.parametrize("path", JSON_BODY_ENDPOINTS)
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b'{"seq": 1,}',
        b"{'seq': 1}",
        b"nul",
        b"\xff\xfe\xfa",
        b'{"seq": 1} trailing',
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"seq": ' + b"1" * 5000 + b"}",
    ],
    ids=lambda d: repr(d[:20]),
)
def test_malformed_json_is_400_malformed(alice, path, data):
    """A body that is not strict JSON (incl. NaN/Infinity, over-long ints) is a JSON 400."""
    http = http_as(alice)
    cid = register(http)
    response = raw_post(http, path.format(cid=cid), data)
    code = error_of(response, 400)["code"]
    assert code in {"malformed", "malformed_json"}
    assert Message.objects.count() == 0 and Room.objects.count() == 0


@pytest.mark.parametrize("path", JSON_BODY_ENDPOINTS)
@pytest.mark.parametrize("data", ["[]", "[1]", "1", "null", '"seq"', "true", "  "])
def test_json_that_is_not_an_object_is_400(alice, path, data):
    """The request body must be a JSON object."""
    http = http_as(alice)
    cid = register(http)
    error_of(raw_post(http, path.format(cid=cid), data), 400, "malformed")


@pytest.mark.parametrize(
    "seq",
    ["1", "", True, False, 1.0, 1.5, -1, 2**63, 2**64, 10**30, None, [1], {"n": 1}],
    ids=repr,
)
def test_ack_with_a_bad_seq_is_400_and_acks_nothing(alice, bob, seq):
    """seq must be a JSON integer in [0, 2**63-1]: strings, bools, floats, negative, huge: 400."""
    ha, hb = http_as(alice), http_as(bob)
    a1, b1 = register(ha), register(hb)
    sent_id(send(hb, b1, "m", {"user": "alice"}, 1))
    error_of(ack(ha, a1, seq), 400, "invalid_seq")
    assert seqs(page(ha, a1)) == [1]


def test_ack_without_seq_is_400(alice):
    """An ack body without seq is 400 invalid_seq."""
    http = http_as(alice)
    cid = register(http)
    error_of(api_post(http, f"/api/clients/{cid}/ack", {}), 400, "invalid_seq")
    error_of(api_post(http, f"/api/clients/{cid}/ack", {"sq": 1}), 400, "invalid_seq")


def test_ack_of_the_largest_64_bit_seq_is_accepted(alice):
    """2**63-1 is still a valid seq (acked as head); 2**63 is not."""
    http = http_as(alice)
    cid = register(http)
    assert ack(http, cid, MAX_INT).json() == {"acked": 0}
    error_of(ack(http, cid, MAX_INT + 1), 400, "invalid_seq")


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"after": "-1"}, "invalid_after"),
        ({"after": "abc"}, "invalid_after"),
        ({"after": ""}, "invalid_after"),
        ({"after": "1.5"}, "invalid_after"),
        ({"after": " 1"}, "invalid_after"),
        ({"after": "0x10"}, "invalid_after"),
        ({"after": "1e3"}, "invalid_after"),
        ({"after": "\uff11"}, "invalid_after"),  # a full-width digit
        ({"after": "\u00b2"}, "invalid_after"),  # superscript two: isdigit() but not a number
        ({"after": str(2**63)}, "invalid_after"),
        ({"after": "9" * 40}, "invalid_after"),
        ({"limit": "0"}, "invalid_limit"),
        ({"limit": "-5"}, "invalid_limit"),
        ({"limit": "ten"}, "invalid_limit"),
        ({"limit": ""}, "invalid_limit"),
        ({"limit": "9" * 40}, "invalid_limit"),
    ],
    ids=repr,
)
def test_messages_with_bad_after_or_limit_is_400(alice, params, code):
    """after must be an integer >= 0 and limit an integer >= 1, else 400."""
    http = http_as(alice)
    cid = register(http)
    error_of(get_messages(http, cid, **params), 400, code)


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"before": "-1"}, "invalid_before"),
        ({"before": "x"}, "invalid_before"),
        ({"before": str(2**64)}, "invalid_before"),
        ({"limit": "0"}, "invalid_limit"),
        ({"limit": "1.0"}, "invalid_limit"),
    ],
    ids=repr,
)
def test_room_history_with_bad_before_or_limit_is_400(alice, params, code):
    """before must be an integer >= 0 and limit an integer >= 1, else 400."""
    http = http_as(alice)
    create_room(http, "r")
    error_of(history(http, "r", **params), 400, code)


def valid_send(cid: str) -> dict:
    return {"client_id": cid, "client_msg_id": "m1", "to": {"user": "bob"}, "body": "hi"}


@pytest.mark.parametrize(
    ("missing", "code"),
    [
        ("client_id", "invalid_client_id"),
        ("client_msg_id", "invalid_client_msg_id"),
        ("to", "invalid_to"),
        ("body", "invalid_body"),
    ],
)
def test_send_without_a_field_is_400(alice, bob, missing, code):
    """Every field of a send is required (a null body is a body; an absent one is not)."""
    http = http_as(alice)
    payload = valid_send(register(http))
    del payload[missing]
    error_of(api_post(http, "/api/messages/", payload), 400, code)
    assert Message.objects.count() == 0


@pytest.mark.parametrize(
    "cmid",
    ["", "x" * 101, 5, None, True, ["a"], {"a": 1}, "a\x00b", "\ud800", "ok\udfffno"],
    ids=repr,
)
def test_send_with_a_bad_client_msg_id_is_400(alice, bob, cmid):
    """client_msg_id is a string of 1 to 100 characters (storable: no NUL, no lone surrogate)."""
    http = http_as(alice)
    payload = valid_send(register(http)) | {"client_msg_id": cmid}
    error_of(api_post(http, "/api/messages/", payload), 400, "invalid_client_msg_id")
    assert Message.objects.count() == 0


@pytest.mark.parametrize("cmid", ["x", "x" * 100, "💬" * 100, "é" * 100, " "], ids=len)
def test_send_with_client_msg_id_of_1_to_100_characters_is_accepted(alice, bob, cmid):
    """1 and 100 characters (Unicode code points) are both fine, and dedup by it works."""
    http = http_as(alice)
    cid = register(http)
    payload = valid_send(cid) | {"client_msg_id": cmid}
    mid = sent_id(api_post(http, "/api/messages/", payload))
    assert sent_id(api_post(http, "/api/messages/", payload), 200) == mid
    assert Message.objects.get(pk=mid).client_msg_id == cmid


@pytest.mark.parametrize(
    ("to", "code"),
    [
        (None, "invalid_to"),
        ("bob", "invalid_to"),
        (["bob"], "invalid_to"),
        ({}, "invalid_to"),
        ({"name": "bob"}, "invalid_to"),
        ({"user": "bob", "room": "r"}, "invalid_to"),
        ({"user": "bob", "extra": 1}, "invalid_to"),
        ({"user": 5}, "invalid_to"),
        ({"user": None}, "invalid_to"),
        ({"user": ""}, "invalid_to"),
        ({"user": ["bob"]}, "invalid_to"),
        ({"user": "b\x00ob"}, "invalid_to"),
        ({"user": "\udc00"}, "invalid_to"),
        ({"user": "x" * 151}, "invalid_to"),
        ({"room": 5}, "invalid_room"),
        ({"room": ""}, "invalid_room"),
        ({"room": "two words"}, "invalid_room"),
        ({"room": "a/b"}, "invalid_room"),
        ({"room": "x" * 65}, "invalid_room"),
        ({"room": "nul\x00"}, "invalid_room"),
        ({"room": "line\n"}, "invalid_room"),
        ({"room": "☕"}, "invalid_room"),
    ],
    ids=repr,
)
def test_send_with_a_bad_to_is_400(alice, bob, to, code):
    """to is exactly {"user": name} or {"room": name} with a valid name."""
    http = http_as(alice)
    payload = valid_send(register(http)) | {"to": to}
    error_of(api_post(http, "/api/messages/", payload), 400, code)
    assert Message.objects.count() == 0


@pytest.mark.parametrize(
    "name",
    [
        *["", " ", "two words", "a/b", "semi;colon", "tab\t", "nul\x00", "x" * 65, "☕", "a\ud800"],
        *[5, None, ["r"], {"name": "r"}],
    ],
    ids=repr,
)
def test_create_room_with_a_bad_name_is_400(alice, name):
    """A room name is 1 to 64 letters, digits, '_', '-' or '.'; else 400 invalid_room."""
    http = http_as(alice)
    error_of(api_post(http, "/api/rooms/", {"name": name}), 400, "invalid_room")
    error_of(api_post(http, "/api/rooms/", {}), 400, "invalid_room")
    assert Room.objects.count() == 0


@pytest.mark.parametrize("name", ["x" * 64, "a.b-c_d", "café", "日本語", "Ωmega9"])
def test_create_room_accepts_unicode_letters_and_64_characters(alice, name):
    """Letters of any script, digits, '_', '-', '.' up to 64 characters make a valid room name."""
    http = http_as(alice)
    assert create_room(http, name) == {"name": name, "members": ["alice"]}
    assert join(http, name)["name"] == name
    assert history(http, name).json() == {"messages": []}
    cid = register(http)
    sent_id(send(http, cid, "m", {"room": name}, "hi"))
    assert page(http, cid)["deliveries"][0]["message"]["to"] == {"room": name}


@pytest.mark.parametrize("suffix", ["join", "leave", "messages"])
@pytest.mark.parametrize("name", ["two words", "a;b", "x" * 65, "nul\x00"], ids=repr)
def test_room_url_with_a_bad_name_is_400(alice, name, suffix):
    """A room URL whose name could never be a room is 400 invalid_room (never a 500)."""
    http = http_as(alice)
    path = f"/api/rooms/{quote(name)}/{suffix}"
    response = http.get(path) if suffix == "messages" else api_post(http, path)
    error_of(response, 400, "invalid_room")


# -- 401 ---------------------------------------------------------------------------------------


ENDPOINTS = [
    ("post", "/api/clients/", None),
    ("delete", "/api/clients/{cid}/", None),
    ("post", "/api/clients/{cid}/close", None),
    ("get", "/api/clients/{cid}/messages", None),
    ("post", "/api/clients/{cid}/ack", {"seq": 0}),
    ("post", "/api/messages/", "send"),
    ("get", "/api/rooms/", None),
    ("post", "/api/rooms/", {"name": "fresh"}),
    ("post", "/api/rooms/{room}/join", None),
    ("post", "/api/rooms/{room}/leave", None),
    ("get", "/api/rooms/{room}/messages", None),
]
UNSAFE = [e for e in ENDPOINTS if e[0] != "get"]


def endpoint_id(endpoint) -> str:
    return f"{endpoint[0].upper()} {endpoint[1]}"


def state() -> tuple:
    return (
        sorted(str(i) for i in Client.objects.values_list("id", flat=True)),
        list(Client.objects.order_by("id").values_list("closing_at", "acked_seq")),
        Message.objects.count(),
        Delivery.objects.count(),
        sorted(Room.objects.values_list("name", flat=True)),
        sorted(Room.members.through.objects.values_list("room_id", "user_id")),
    )


@pytest.fixture
def world(alice, bob):
    """
    A client of alice with one delivery, and a room of bob's: real targets for every endpoint.
    """
    ha, hb = http_as(alice), http_as(bob)
    cid, b1 = register(ha), register(hb)
    create_room(hb, "room1")
    sent_id(send(hb, b1, "seed", {"user": "alice"}, "seed"))
    return {"cid": cid, "room": "room1", "bob_client": b1}


def endpoint_request(endpoint, world: dict, cid: str | None = None):
    method, template, payload = endpoint
    cid = cid or world["cid"]
    path = template.format(cid=cid, room=world["room"])
    if payload == "send":
        payload = {"client_id": cid, "client_msg_id": "x1", "to": {"user": "bob"}, "body": 1}
    return method, path, payload


@pytest.mark.parametrize("csrf", [False, True], ids=["csrf-off", "csrf-on"])
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=endpoint_id)
def test_anonymous_caller_is_401_on_every_endpoint(world, endpoint, csrf):
    """Not logged in is 401 not_authenticated (before any CSRF check), and changes nothing."""
    anonymous = http_as(None, csrf=csrf)
    before = state()
    method, path, payload = endpoint_request(endpoint, world)
    error_of(call(anonymous, method, path, payload), 401, "not_authenticated")
    assert state() == before


# -- 403 ---------------------------------------------------------------------------------------


CLIENT_ENDPOINTS = [e for e in ENDPOINTS if "{cid}" in e[1] or e[2] == "send"]


@pytest.mark.parametrize("endpoint", CLIENT_ENDPOINTS, ids=endpoint_id)
def test_another_users_client_is_403_on_every_client_endpoint(world, carol, endpoint):
    """Using a client of another user is 403 not_your_client, and changes nothing."""
    intruder = http_as(carol)
    register(intruder)
    before = state()
    method, path, payload = endpoint_request(endpoint, world)
    error_of(call(intruder, method, path, payload), 403, "not_your_client")
    assert state() == before


@pytest.mark.parametrize("endpoint", UNSAFE, ids=endpoint_id)
def test_unsafe_call_without_csrf_token_is_json_403_csrf_failed(world, alice, endpoint):
    """With CSRF enforced, an unsafe call without a token is JSON 403 csrf_failed; no change."""
    http = http_as(alice, csrf=True)
    with_csrf_cookie(http)
    before = state()
    method, path, payload = endpoint_request(endpoint, world)
    error_of(call(http, method, path, payload), 403, "csrf_failed")
    # Without even a cookie, the same.
    error_of(call(http_as(alice, csrf=True), method, path, payload), 403, "csrf_failed")
    # A wrong token, the same.
    error_of(call(http, method, path, payload, HTTP_X_CSRFTOKEN="x" * 32), 403, "csrf_failed")
    assert state() == before


EXPECTED_STATUS = {
    "/api/clients/": 201,
    "/api/clients/{cid}/": 204,
    "/api/clients/{cid}/close": 204,
    "/api/clients/{cid}/ack": 200,
    "/api/messages/": 201,
    "/api/rooms/": 201,
    "/api/rooms/{room}/join": 200,
    "/api/rooms/{room}/leave": 200,
}


@pytest.mark.parametrize("endpoint", UNSAFE, ids=endpoint_id)
def test_unsafe_call_with_csrf_token_header_succeeds(world, alice, endpoint):
    """The same calls pass CSRF enforcement with the X-CSRFToken header (the token is the key)."""
    http = http_as(alice, csrf=True)
    token = with_csrf_cookie(http)
    method, path, payload = endpoint_request(endpoint, world)
    response = call(http, method, path, payload, HTTP_X_CSRFTOKEN=token)
    assert response.status_code == EXPECTED_STATUS[endpoint[1]], response.content


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e[0] == "get"], ids=endpoint_id)
def test_safe_calls_need_no_csrf_token(world, alice, endpoint):
    """GET calls work with CSRF enforced and no token."""
    join(http_as(alice), world["room"])
    method, path, payload = endpoint_request(endpoint, world)
    assert call(http_as(alice, csrf=True), method, path, payload).status_code == 200


# -- 404 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["random-uuid4", "not-a-uuid", "123", "%00", "' OR 1=1 --"])
@pytest.mark.parametrize("endpoint", CLIENT_ENDPOINTS, ids=endpoint_id)
def test_unknown_or_non_uuid_client_is_404(world, alice, endpoint, bad_id):
    """A client id naming no client (unknown UUID, or not a UUID at all) is 404 unknown_client."""
    http = http_as(alice)
    bad = str(uuid.uuid4()) if bad_id == "random-uuid4" else bad_id
    method, _, payload = endpoint_request(endpoint, world, cid=bad)
    _, template, _ = endpoint
    path = template.format(cid=quote(bad, safe=""), room=world["room"])
    before = state()
    error_of(call(http, method, path, payload), 404, "unknown_client")
    assert state() == before


@pytest.mark.parametrize("client_id", ["", "\x00", "\ud800", "abc"], ids=repr)
def test_send_with_a_client_id_string_naming_no_client_is_404(alice, client_id):
    """A client_id string that names no client is 404 unknown_client."""
    http = http_as(alice)
    register(http)
    payload = valid_send("") | {"client_id": client_id}
    error_of(api_post(http, "/api/messages/", payload), 404, "unknown_client")


@pytest.mark.parametrize("client_id", [5, None, True, [], {"id": 1}], ids=repr)
def test_send_with_a_client_id_of_the_wrong_type_is_400(alice, client_id):
    """A client_id that is not a string is malformed: 400 invalid_client_id, never a 500."""
    http = http_as(alice)
    register(http)
    payload = valid_send("") | {"client_id": client_id}
    error_of(api_post(http, "/api/messages/", payload), 400, "invalid_client_id")


@pytest.mark.parametrize(
    "request_",
    [
        ("post", "/api/rooms/nowhere/join"),
        ("post", "/api/rooms/nowhere/leave"),
        ("get", "/api/rooms/nowhere/messages"),
        ("send", "nowhere"),
    ],
    ids=lambda r: " ".join(r),
)
def test_unknown_room_is_404(alice, request_):
    """A room that does not exist is 404 unknown_room for join, leave, history and send."""
    http = http_as(alice)
    cid = register(http)
    method, path = request_
    if method == "send":
        response = send(http, cid, "m", {"room": path}, 1)
    else:
        response = call(http, method, path)
    error_of(response, 404, "unknown_room")
    assert Room.objects.count() == 0 and Message.objects.count() == 0


@pytest.mark.parametrize("name", ["nobody", "Bob", "bob ", "ゾーイ"])
def test_unknown_user_as_to_is_404(alice, bob, name):
    """Sending to a user who does not exist is 404 unknown_user; nothing is stored."""
    http = http_as(alice)
    cid = register(http)
    error_of(send(http, cid, "m", {"user": name}, 1), 404, "unknown_user")
    assert Message.objects.count() == 0 and Delivery.objects.count() == 0


@pytest.mark.parametrize("method", ["get", "post", "delete"])
@pytest.mark.parametrize(
    "path",
    [
        "/api/",
        "/api/nope",
        "/api/nope/",
        "/api/clients",
        "/api/messages",
        "/api/rooms",
        "/api/clients/{cid}",
        "/api/clients/{cid}/messages/",
        "/api/clients/{cid}/ack/",
        "/api/rooms/r/join/",
        "/api/rooms/r/members",
        "/api/ünïcödé",
    ],
)
def test_unknown_api_path_is_json_404(alice, method, path):
    """Anything under /api/ that is no endpoint is a JSON 404 (no HTML, no slash redirect)."""
    http = http_as(alice)
    cid = register(http)
    response = call(http, method, quote(path.format(cid=cid)), {"seq": 1})
    error_of(response, 404, "not_found")
    error_of(call(http_as(None), method, quote(path.format(cid=cid))), 404, "not_found")


# -- 405 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/api/clients/", "POST"),
        ("PUT", "/api/clients/", "POST"),
        ("DELETE", "/api/clients/", "POST"),
        ("GET", "/api/clients/{cid}/", "DELETE"),
        ("POST", "/api/clients/{cid}/", "DELETE"),
        ("GET", "/api/clients/{cid}/close", "POST"),
        ("DELETE", "/api/clients/{cid}/close", "POST"),
        ("POST", "/api/clients/{cid}/messages", "GET"),
        ("GET", "/api/clients/{cid}/ack", "POST"),
        ("PATCH", "/api/clients/{cid}/ack", "POST"),
        ("GET", "/api/messages/", "POST"),
        ("PUT", "/api/messages/", "POST"),
        ("DELETE", "/api/rooms/", "GET, POST"),
        ("GET", "/api/rooms/r/join", "POST"),
        ("GET", "/api/rooms/r/leave", "POST"),
        ("POST", "/api/rooms/r/messages", "GET"),
    ],
)
def test_wrong_method_is_json_405_with_allow(alice, method, path, allow):
    """A method the endpoint does not take is 405 method_not_allowed with an Allow header."""
    http = http_as(alice)
    cid = register(http)
    create_room(http, "r")
    before = state()
    response = http.generic(method, path.format(cid=cid), "{}", content_type=JSON)
    error_of(response, 405, "method_not_allowed")
    assert response["Allow"] == allow
    assert state() == before


# -- 409, 413, 429 -----------------------------------------------------------------------------


def test_body_over_max_body_bytes_is_413_body_too_large(alice, bob, settings):
    """A body over MESSAGING_MAX_BODY_BYTES (compact UTF-8 JSON) is 413; exactly at it is fine."""
    settings.MESSAGING_MAX_BODY_BYTES = 1000
    http = http_as(alice)
    cid = register(http)
    at_limit = "x" * 998  # "xxx…" encodes to 1000 bytes with its quotes
    sent_id(send(http, cid, "ok", {"user": "bob"}, at_limit))
    error_of(send(http, cid, "big", {"user": "bob"}, at_limit + "x"), 413, "body_too_large")
    error_of(send(http, cid, "big2", {"user": "bob"}, {"k": ["y" * 2000]}), 413, "body_too_large")
    # Multi-byte characters count by their UTF-8 size: 500 two-byte characters are 1002 bytes.
    error_of(send(http, cid, "big3", {"user": "bob"}, "é" * 500), 413, "body_too_large")
    assert Message.objects.count() == 1


def test_body_limit_counts_utf8_not_the_escaping_of_the_request(alice, bob, settings):
    """A body within the limit is accepted however the request escapes it (json.dumps uses \\u)."""
    settings.MESSAGING_MAX_BODY_BYTES = 10_000
    http = http_as(alice)
    cid = register(http)
    text = "日本語" * 1109
    text += "x" * (10_000 - len(json.dumps({"text": text}, ensure_ascii=False).encode()) + 1)
    body = {"text": text}
    compact = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    assert len(compact) == 10_000  # exactly at the limit
    envelope = {"client_id": cid, "client_msg_id": "u", "to": {"user": "bob"}, "body": body}
    raw = json.dumps(envelope)  # what Python clients send: every CJK character as \\uXXXX
    assert len(raw) > 2 * 10_000
    mid = sent_id(raw_post(http, "/api/messages/", raw))
    assert delivered_body(http, cid, mid) == body
    pretty = json.dumps(envelope | {"client_msg_id": "p"}, ensure_ascii=False, indent=4)
    sent_id(raw_post(http, "/api/messages/", pretty.encode()))
    # One more character makes the body itself too large, however it is sent.
    body = {"text": body["text"] + "x"}
    for ensure_ascii in (True, False):
        raw = json.dumps(envelope | {"client_msg_id": "x", "body": body}, ensure_ascii=ensure_ascii)
        error_of(raw_post(http, "/api/messages/", raw.encode()), 413, "body_too_large")


def delivered_body(http, cid: str, mid: int):
    for d in page(http, cid, limit=1000)["deliveries"]:
        if d["message"]["id"] == mid:
            return d["message"]["body"]
    raise AssertionError(f"message {mid} not delivered")


def test_request_body_far_over_the_limit_is_413(alice, bob, settings):
    """A request body far larger than any valid send is refused before parsing: 413."""
    settings.MESSAGING_MAX_BODY_BYTES = 1000
    http = http_as(alice)
    cid = register(http)
    padding = " " * 200_000
    raw = envelope_text(cid, "1", padding=padding)
    error_of(raw_post(http, "/api/messages/", raw), 413, "body_too_large")
    error_of(
        raw_post(http, f"/api/clients/{cid}/ack", '{"seq": 0}' + padding), 413, "body_too_large"
    )
    error_of(raw_post(http, "/api/rooms/", '{"name": "r"}' + padding), 413, "body_too_large")
    assert Message.objects.count() == 0 and Room.objects.count() == 0


@pytest.mark.parametrize("endpoint", UNSAFE, ids=endpoint_id)
def test_huge_declared_content_length_is_413(world, alice, endpoint):
    """A request declaring a huge Content-Length is 413 body_too_large without reading it."""
    http = http_as(alice)
    method, path, payload = endpoint_request(endpoint, world)
    before = state()
    response = http.generic(
        method.upper(), path, json.dumps(payload), content_type=JSON, CONTENT_LENGTH=str(10**12)
    )
    error_of(response, 413, "body_too_large")
    assert state() == before


@pytest.mark.parametrize("content_length", [str(10**12), str(3 * 1024 * 1024)])
def test_huge_beacon_with_csrf_enforced_is_json_413(alice, content_length):
    """A form-encoded close declaring a huge body (CSRF reads forms) is a JSON 413, not HTML."""
    http = http_as(alice, csrf=True)
    cid = register(http_as(alice))
    token = with_csrf_cookie(http)
    response = raw_post(
        http,
        f"/api/clients/{cid}/close",
        f"csrfmiddlewaretoken={token}",
        "application/x-www-form-urlencoded",
        CONTENT_LENGTH=content_length,
    )
    error_of(response, 413, "body_too_large")
    assert Client.objects.get(pk=cid).closing_at is None


def test_beacon_with_too_many_form_fields_is_json_400(alice):
    """A form body Django refuses to parse (too many fields) is a JSON 400, not an HTML page."""
    http = http_as(alice, csrf=True)
    cid = register(http_as(alice))
    token = with_csrf_cookie(http)
    data = "&".join(f"f{i}=1" for i in range(2000)) + f"&csrfmiddlewaretoken={token}"
    response = raw_post(
        http, f"/api/clients/{cid}/close", data, "application/x-www-form-urlencoded"
    )
    error_of(response, 400)
    assert Client.objects.get(pk=cid).closing_at is None


@pytest.mark.parametrize("content_length", ["abc", "-1"])
def test_invalid_content_length_never_500s(alice, content_length):
    """A Content-Length that is not a number is answered with a JSON 4xx, never a 500."""
    http = http_as(alice)
    response = http.generic(
        "POST", "/api/rooms/", '{"name": "r"}', content_type=JSON, CONTENT_LENGTH=content_length
    )
    assert 400 <= response.status_code < 500
    error_of(response, response.status_code)


def test_sends_over_the_rate_are_429_rate_limited(alice, bob, settings):
    """Past MESSAGING_SEND_BURST sends at a tiny MESSAGING_SEND_RATE: 429; retries are still 200."""
    settings.MESSAGING_SEND_RATE = 0.001
    settings.MESSAGING_SEND_BURST = 2
    http = http_as(alice)
    cid = register(http)
    first = sent_id(send(http, cid, "r1", {"user": "bob"}, 1))
    sent_id(send(http, cid, "r2", {"user": "bob"}, 2))
    error_of(send(http, cid, "r3", {"user": "bob"}, 3), 429, "rate_limited")
    error_of(send(http, cid, "r4", {"user": "bob"}, 4), 429, "rate_limited")
    assert Message.objects.count() == 2
    assert page(http, cid)["head"] == 2
    # Answering a retry of a stored message stores nothing, so it is never limited.
    assert sent_id(send(http, cid, "r1", {"user": "bob"}, 1), status=200) == first


def test_rate_limit_off_when_rate_is_none(alice, bob, settings):
    """With MESSAGING_SEND_RATE = None there is no limit even with a tiny burst."""
    settings.MESSAGING_SEND_RATE = None
    settings.MESSAGING_SEND_BURST = 1
    http = http_as(alice)
    cid = register(http)
    for i in range(5):
        sent_id(send(http, cid, f"n{i}", {"user": "bob"}, i))


# -- never a 500 -------------------------------------------------------------------------------


AWKWARD_BODIES = [
    "nul \x00 inside",
    {"k\x00ey": "v\x00al"},
    "\ud800",
    {"\udfff": ["\ud83d", "x\ude00", "\udbff"]},
    "😀 עִבְרִית العربية 日本語 e\u0301 \u200b\ufeff \u2028\u2029",
    {"": "", "🔑": {"nested": [None, True, False, 0, -0.0, 1e308, -(2**70), 2**70]}},
    "\\u0000 and \\ud800 written as text",
    '</script><script>alert("x")</script>',
    None,
    0,
    "",
    [],
    {},
]


@pytest.mark.parametrize("body", AWKWARD_BODIES, ids=lambda b: repr(b)[:30])
def test_any_json_body_is_stored_and_delivered_unchanged(alice, bob, body):
    """NUL, lone surrogates, any Unicode or JSON value as body: 201 and delivered byte for byte."""
    ha, hb = http_as(alice), http_as(bob)
    a1, b1 = register(ha), register(hb)
    create_room(ha, "awk")
    join(hb, "awk")
    mid = sent_id(send(ha, a1, "awkward", {"user": "bob"}, body))
    (delivery,) = page(hb, b1)["deliveries"]
    assert delivery["message"]["id"] == mid
    assert delivery["message"]["body"] == body
    assert json.dumps(delivery["message"]["body"]) == json.dumps(body)
    sent_id(send(ha, a1, "awkward-room", {"room": "awk"}, body))
    (message,) = history(hb, "awk").json()["messages"]
    assert json.dumps(message["body"]) == json.dumps(body)


@pytest.mark.parametrize(
    "literal", ["NaN", "Infinity", "-Infinity", "[NaN]", '{"x": Infinity}', "1e400", "-1e999"]
)
def test_nan_and_infinity_in_a_body_are_400(alice, bob, literal):
    """NaN, Infinity and overflowing floats are not JSON numbers: 400, nothing stored."""
    http = http_as(alice)
    cid = register(http)
    raw = envelope_text(cid, literal)
    code = error_of(raw_post(http, "/api/messages/", raw), 400)["code"]
    assert code in {"malformed_json", "invalid_body"}
    assert Message.objects.count() == 0


@pytest.mark.parametrize("depth", [20, 300])
def test_moderately_nested_body_is_stored(alice, bob, depth):
    """A nested body under the size limit is stored and delivered intact."""
    http = http_as(alice)
    cid = register(http)
    nested = "[" * depth + "1" + "]" * depth
    raw = envelope_text(cid, nested)
    mid = sent_id(raw_post(http, "/api/messages/", raw))
    response = get_messages(http, cid)
    assert f'"body":{nested}'.encode() in response.content
    assert response.json()["deliveries"][0]["message"]["id"] == mid


@pytest.mark.parametrize("depth", [900, 995, 1500, 20_000])
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_json_is_400_or_stored_never_500(alice, bob, depth, opener):
    """Nesting past the parser's depth is 400; just under it may be stored, never a 500."""
    http = http_as(alice)
    cid = register(http)
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    raw = envelope_text(cid, nested)
    response = raw_post(http, "/api/messages/", raw)
    if response.status_code == 201:
        delivered = get_messages(http, cid)
        assert delivered.status_code == 200
        assert f'"body":{nested}'.encode() in delivered.content
    else:
        assert error_of(response, 400)["code"] in {"malformed_json", "invalid_body"}
        assert Message.objects.count() == 0
    if depth >= 1500:
        assert response.status_code == 400
    # Deep nesting in any other field is 400 too.
    for field in ("to", "client_msg_id", "client_id"):
        raw = json.dumps(valid_send(cid)).replace(f'"{field}": ', f'"{field}": {nested}, "_": ', 1)
        response = raw_post(http, "/api/messages/", raw)
        assert response.status_code in {400, 404}, (field, response.status_code)
        error_of(response, response.status_code)
    error_of(raw_post(http, f"/api/clients/{cid}/ack", f'{{"seq": {nested}}}'), 400)
    error_of(raw_post(http, "/api/rooms/", f'{{"name": {nested}}}'), 400)


def test_unicode_user_names_and_bodies_work_everywhere(alice):
    """Non-ASCII user names, room names and bodies round-trip through every endpoint."""
    zoe = make_user("zoë")
    han = make_user("张伟")
    hz, hh = http_as(zoe), http_as(han)
    z1, h1 = register(hz), register(hh)
    mid = sent_id(send(hz, z1, "ü-1", {"user": "张伟"}, {"текст": "привет 👋"}))
    (delivery,) = page(hh, h1)["deliveries"]
    assert delivery["message"]["id"] == mid
    assert delivery["message"]["from"] == {"user": "zoë", "client_id": z1}
    assert delivery["message"]["to"] == {"user": "张伟"}
    assert delivery["message"]["body"] == {"текст": "привет 👋"}
    room = create_room(hh, "чат")
    assert room == {"name": "чат", "members": ["张伟"]}
    assert sorted(join(hz, "чат")["members"]) == sorted(["zoë", "张伟"])
    sent_id(send(hz, z1, "ü-2", {"room": "чат"}, "ok"))
    (message,) = history(hh, "чат").json()["messages"]
    assert message["from"]["user"] == "zoë" and message["to"] == {"room": "чат"}
    rooms = hz.get("/api/rooms/").json()["rooms"]
    assert [r["name"] for r in rooms] == ["чат"]
