"""Direct-message history: what is not queued can be reloaded, by the two parties only."""

import pytest

from tests.conftest import api_post, http_as, register

pytestmark = pytest.mark.django_db(transaction=True)


def send(http, cid: str, cmid: str, to: str, text: str) -> int:
    response = api_post(
        http,
        "/api/messages/",
        {"client_id": cid, "client_msg_id": cmid, "to": {"user": to}, "body": text},
    )
    assert response.status_code == 201, response.content
    return response.json()["id"]


def bodies(http, path: str) -> list:
    response = http.get(path)
    assert response.status_code == 200, response.content
    return [m["body"] for m in response.json()["messages"]]


def test_a_conversation_is_both_directions_newest_last_and_pages_with_before(alice, bob, carol):
    """GET /api/direct/{name}/messages holds the caller's messages with {name} both ways, in
    id order, pages backwards with before/limit, and nothing of other conversations."""
    ha, hb, hc = http_as(alice), http_as(bob), http_as(carol)
    a, b, c = register(ha), register(hb), register(hc)
    ids = [
        send(ha, a, "1", "bob", "a->b 1"),
        send(hb, b, "1", "alice", "b->a 1"),
        send(hc, c, "1", "alice", "c->a 1"),
        send(hb, b, "2", "carol", "b->c 1"),
        send(ha, a, "2", "bob", "a->b 2"),
    ]
    assert bodies(ha, "/api/direct/bob/messages") == ["a->b 1", "b->a 1", "a->b 2"]
    assert bodies(hb, "/api/direct/alice/messages") == ["a->b 1", "b->a 1", "a->b 2"]
    assert bodies(ha, "/api/direct/bob/messages?limit=2") == ["b->a 1", "a->b 2"]
    assert bodies(ha, f"/api/direct/bob/messages?before={ids[4]}&limit=1") == ["b->a 1"]
    assert bodies(ha, "/api/direct/carol/messages") == ["c->a 1"]
    # carol sees her conversations with alice and bob, never alice's with bob.
    assert bodies(hc, "/api/direct/bob/messages") == ["b->c 1"]
    assert bodies(hc, "/api/direct/alice/messages") == ["c->a 1"]
    message = http_as(alice).get("/api/direct/carol/messages").json()["messages"][0]
    assert message["from"]["user"] == "carol" and message["to"] == {"user": "alice"}

    listed = ha.get("/api/direct/").json()["conversations"]
    assert listed == [{"user": "bob", "last_id": ids[4]}, {"user": "carol", "last_id": ids[2]}]
    assert hb.get("/api/direct/?limit=1").json()["conversations"] == [
        {"user": "alice", "last_id": ids[4]}
    ]


def test_unknown_users_bad_parameters_and_anonymous_callers_are_refused(alice):
    """An unknown user is 404 unknown_user, a bad before is 400, no login is 401."""
    http = http_as(alice)
    response = http.get("/api/direct/nobody/messages")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_user"
    response = http.get("/api/direct/alice/messages?before=x")
    assert response.json()["error"]["code"] == "invalid_before"
    assert http_as(None).get("/api/direct/").status_code == 401
    assert http_as(None).get("/api/direct/alice/messages").status_code == 401
    assert http.get("/api/direct/").json() == {"conversations": []}


def test_a_direct_message_past_a_full_queue_is_in_the_history(alice, bob, carol, settings):
    """A flooded tab is told resync_required and gets none of the later direct messages in its
    queue; the conversation list and history hold them."""
    settings.MESSAGING_QUEUE_LIMIT = 3
    ha, hb, hc = http_as(alice), http_as(bob), http_as(carol)
    victim, flooder, third = register(ha), register(hb), register(hc)
    for i in range(5):
        send(hb, flooder, f"f{i}", "alice", f"flood {i}")
    missed = send(hc, third, "1", "alice", "from carol")
    page = ha.get(f"/api/clients/{victim}/messages").json()
    assert page["resync_required"] is True
    assert missed not in [d["message"]["id"] for d in page["deliveries"]]

    partners = [c["user"] for c in ha.get("/api/direct/").json()["conversations"]]
    assert partners == ["carol", "bob"]
    assert bodies(ha, "/api/direct/carol/messages") == ["from carol"]
