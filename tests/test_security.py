"""Security promises that tests/test_http_api.py and tests/test_ws_errors.py do not already pin
down: CSRF tokens count only from the site's own origin, the send rate is one bucket per client
whatever the transport, and the request size limit holds without a Content-Length."""

import json

import pytest
from channels.db import database_sync_to_async
from channels.testing import HttpCommunicator

from chatproject.asgi import application
from messaging.models import Message, Room
from tests.conftest import TIMEOUT, api_post, connect_tab, http_as, new_client, session_cookie

CSRF_TOKEN = "k" * 32


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """
    Users are created per test and no password is ever checked: hash them cheaply.
    """
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def csrf_session(user):
    """
    A CSRF-enforcing session of `user` holding a CSRF cookie, as the chat page leaves it.
    """
    http = http_as(user, csrf=True)
    http.cookies["csrftoken"] = CSRF_TOKEN
    return http


@pytest.mark.django_db
@pytest.mark.parametrize(
    "secure, headers, allowed",
    [
        (False, {}, True),
        (False, {"HTTP_ORIGIN": "http://testserver"}, True),
        (False, {"HTTP_ORIGIN": "http://evil.example"}, False),
        (False, {"HTTP_ORIGIN": "http://testserver.evil.example"}, False),
        (False, {"HTTP_ORIGIN": "https://testserver"}, False),
        (False, {"HTTP_ORIGIN": "null"}, False),
        (True, {"HTTP_ORIGIN": "https://testserver"}, True),
        (True, {"HTTP_REFERER": "https://testserver/"}, True),
        (True, {}, False),
        (True, {"HTTP_REFERER": "https://evil.example/"}, False),
        (True, {"HTTP_REFERER": "http://testserver/"}, False),
        (
            True,
            {"HTTP_ORIGIN": "https://evil.example", "HTTP_REFERER": "https://testserver/"},
            False,
        ),
    ],
    ids=lambda value: repr(value) if isinstance(value, dict) else str(value),
)
def test_a_valid_csrf_token_counts_only_from_the_sites_own_origin(alice, secure, headers, allowed):
    """A request carrying the right CSRF cookie and token is still refused (JSON 403
    csrf_failed, nothing changed) when its Origin, or over HTTPS its Referer, is another site."""
    http = csrf_session(alice)
    response = api_post(
        http,
        "/api/rooms/",
        {"name": "csrf"},
        secure=secure,
        HTTP_X_CSRFTOKEN=CSRF_TOKEN,
        **headers,
    )
    if allowed:
        assert response.status_code == 201, response.content
        assert Room.objects.filter(name="csrf").exists()
    else:
        assert response.status_code == 403, response.content
        assert response.json()["error"]["code"] == "csrf_failed"
        assert not Room.objects.exists()


@database_sync_to_async
def http_send(user, client_id: str, cmid: str) -> int:
    payload = {"client_id": client_id, "client_msg_id": cmid, "to": {"user": "bob"}, "body": 1}
    return api_post(http_as(user), "/api/messages/", payload).status_code


def ws_send_frame(cmid: str) -> dict:
    return {"type": "send", "client_msg_id": cmid, "to": {"user": "bob"}, "body": 1}


async def next_answer(tab) -> dict:
    """
    The tab's next `sent` or `error` frame (its own deliveries and presence are skipped).
    """
    while True:
        frame = await tab.recv()
        if frame["type"] in ("sent", "error"):
            return frame


@pytest.mark.django_db(transaction=True)
async def test_send_rate_is_one_bucket_per_client_across_http_and_websocket(alice, bob, settings):
    """A client that spent its burst over HTTP is rate limited on its socket too, and the other
    way round (the transports do not add up); another tab of the same user has its own bucket."""
    settings.MESSAGING_SEND_RATE = 0.001
    settings.MESSAGING_SEND_BURST = 2
    a1, a2 = await new_client(alice), await new_client(alice)
    tab1 = await connect_tab(alice, a1)
    assert await http_send(alice, a1, "h1") == 201
    assert await http_send(alice, a1, "h2") == 201
    await tab1.send(ws_send_frame("w1"))
    answer = await next_answer(tab1)
    assert answer["type"] == "error" and answer["code"] == "rate_limited", answer
    assert answer["client_msg_id"] == "w1"

    tab2 = await connect_tab(alice, a2)
    await tab2.send(ws_send_frame("w2"))
    assert (await next_answer(tab2))["type"] == "sent"
    await tab2.send(ws_send_frame("w3"))
    assert (await next_answer(tab2))["type"] == "sent"
    assert await http_send(alice, a2, "h3") == 429

    assert await database_sync_to_async(Message.objects.count)() == 4
    await tab1.disconnect()
    await tab2.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/api/rooms/", "/api/messages/"])
async def test_body_over_the_limit_without_content_length_is_413(alice, settings, path):
    """A request body past the request limit with no Content-Length header (a chunked upload,
    which the declared-size check cannot see) is refused 413 body_too_large once read."""
    settings.MESSAGING_MAX_BODY_BYTES = 1000
    cookie = await database_sync_to_async(session_cookie)(alice)
    body = json.dumps({"name": "big", "body": 1, "padding": "x" * 20_000}).encode()
    headers = [
        (b"host", b"localhost"),
        (b"cookie", f"{cookie}; csrftoken={CSRF_TOKEN}".encode()),
        (b"x-csrftoken", CSRF_TOKEN.encode()),
        (b"content-type", b"application/json"),
    ]
    communicator = HttpCommunicator(application, "POST", path, body=body, headers=headers)
    response = await communicator.get_response(timeout=TIMEOUT)
    assert response["status"] == 413, response
    assert json.loads(response["body"])["error"]["code"] == "body_too_large"
    assert not await database_sync_to_async(Room.objects.exists)()
