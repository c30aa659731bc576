"""The refusal and bad-input half of the WebSocket protocol: close codes, the Origin check,
error frames that leave the socket usable, the send rate limit and typing."""

import asyncio
import json
import uuid

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from chatproject.asgi import application
from clients.models import Client
from messaging.models import Delivery, Message
from tests.conftest import (
    HOST,
    ORIGIN,
    TIMEOUT,
    api_post,
    connect_tab,
    http_as,
    new_client,
    open_ws,
    random_id,
    refused_with,
    session_cookie,
)

pytestmark = pytest.mark.django_db(transaction=True)

ABSENT = object()
MAX_INT = 2**63 - 1


def send_frame(cmid, to, body) -> dict:
    return {"type": "send", "client_msg_id": cmid, "to": to, "body": body}


@database_sync_to_async
def channel_of(client_id: str) -> str:
    return Client.objects.get(pk=client_id).channel_name


@database_sync_to_async
def message_count() -> int:
    return Message.objects.count()


@database_sync_to_async
def queue_of(client_id: str) -> list[int]:
    return list(
        Delivery.objects.filter(client_id=client_id).order_by("seq").values_list("seq", flat=True)
    )


@database_sync_to_async
def delete_client(user, client_id: str) -> None:
    response = http_as(user).delete(f"/api/clients/{client_id}/")
    assert response.status_code == 204, response.content


@database_sync_to_async
def make_room(creator, name: str, *joiners) -> None:
    response = api_post(http_as(creator), "/api/rooms/", {"name": name})
    assert response.status_code == 201, response.content
    for user in joiners:
        response = api_post(http_as(user), f"/api/rooms/{name}/join")
        assert response.status_code == 200, response.content


async def recv(tab, timeout: float = TIMEOUT) -> dict:
    """
    The next frame that is not a `presence` frame (ephemeral, sent whenever a peer comes or goes).
    """
    while True:
        frame = await tab.recv(timeout)
        if frame.get("type") != "presence":
            return frame


async def quiet(tab, timeout: float = 0.3) -> bool:
    """
    True when nothing but `presence` frames arrives within `timeout`.
    """
    while not await tab.nothing(timeout):
        frame = await tab.recv()
        assert frame.get("type") == "presence", f"unexpected frame: {frame}"
    return True


async def expect_error(tab, code: str, cmid=ABSENT) -> dict:
    """
    The next frame is an `error` frame with `code`, a non-empty detail and (only when given)
    that client_msg_id.
    """
    frame = await recv(tab)
    assert frame.get("type") == "error", frame
    assert frame["code"] == code, frame
    assert isinstance(frame["detail"], str) and frame["detail"], frame
    if cmid is ABSENT:
        assert set(frame) == {"type", "code", "detail"}, frame
    else:
        assert set(frame) == {"type", "code", "detail", "client_msg_id"}, frame
        assert frame["client_msg_id"] == cmid, frame
    return frame


async def sent_and_delivery(tab) -> tuple[dict, dict]:
    """
    Read a `sent` frame and a `delivery` frame, in either order, and nothing else.
    """
    sent = delivery = None
    while sent is None or delivery is None:
        frame = await recv(tab)
        if frame["type"] == "sent" and sent is None:
            sent = frame
        elif frame["type"] == "delivery" and delivery is None:
            delivery = frame
        else:
            raise AssertionError(f"unexpected frame: {frame}")
    return sent, delivery


async def assert_usable(tab, me: str = "alice") -> dict:
    """
    The socket still works: a valid send is answered `sent` and delivered back to this tab, and
    nothing else arrives.
    """
    cmid = f"ok-{uuid.uuid4().hex}"
    body = {"still": "usable", "cmid": cmid}
    await tab.send(send_frame(cmid, {"user": me}, body))
    sent, delivery = await sent_and_delivery(tab)
    assert sent == {"type": "sent", "client_msg_id": cmid, "id": sent["id"], "duplicate": False}
    assert delivery["message"]["id"] == sent["id"]
    assert delivery["message"]["body"] == body
    assert await quiet(tab)
    return delivery


async def handshake(user, query: str, origin: bytes | None) -> tuple[bool, object, object]:
    """
    Open a socket with the given Origin header (None: no header); return (accepted, code or
    subprotocol, communicator).
    """
    headers = [HOST] + ([] if origin is None else [(b"origin", origin)])
    if user is not None:
        cookie = await database_sync_to_async(session_cookie)(user)
        headers.append((b"cookie", cookie.encode()))
    comm = WebsocketCommunicator(application, f"/ws/?{query}", headers=headers)
    accepted, extra = await comm.connect(timeout=TIMEOUT)
    return accepted, extra, comm


# -- refusals --------------------------------------------------------------------------------


async def test_anonymous_socket_is_refused_with_4401(alice):
    """A socket without a logged-in session is closed with 4401 and attaches nothing."""
    cid = await new_client(alice)
    assert await refused_with(None, f"client_id={cid}") == 4401
    assert await refused_with(None, f"client_id={cid}&after=0") == 4401
    assert await channel_of(cid) == ""


async def test_invalid_session_cookie_is_refused_with_4401(alice):
    """A forged or expired session cookie is the same as no login: 4401."""
    cid = await new_client(alice)
    comm = WebsocketCommunicator(
        application,
        f"/ws/?client_id={cid}",
        headers=[HOST, (b"origin", ORIGIN), (b"cookie", b"sessionid=not-a-real-session")],
    )
    accepted, _ = await comm.connect(timeout=TIMEOUT)
    assert accepted
    output = await comm.receive_output(TIMEOUT)
    assert output == {"type": "websocket.close", "code": 4401}
    await comm.disconnect()
    assert await channel_of(cid) == ""


@pytest.mark.parametrize(
    "query",
    [
        "",
        "after=0",
        "client_id=",
        "client_id=not-a-uuid",
        "client_id=12345",
        "client_id={cid}x",
        "client_id={cid}&after=-1",
        "client_id={cid}&after=abc",
        "client_id={cid}&after=1.5",
        "client_id={cid}&after=1e3",
        "client_id={cid}&after=%2B1",
        "client_id={cid}&after=%20",
        "client_id={cid}&after=%D9%A1",  # ARABIC-INDIC DIGIT ONE: int() takes it, the protocol not
        f"client_id={{cid}}&after={2**63}",
        f"client_id={{cid}}&after={10**30}",
        "client_id={cid}&conn=-1",
        "client_id={cid}&conn=two",
        f"client_id={{cid}}&conn={2**63}",
    ],
    ids=lambda q: q.replace("{cid}", "CID") or "empty",
)
async def test_malformed_query_is_refused_with_4400(alice, query):
    """A client_id that is not a UUID, or an after or conn not an integer in [0, 2**63), is
    4400."""
    cid = await new_client(alice)
    assert await refused_with(alice, query.format(cid=cid)) == 4400
    assert await channel_of(cid) == ""


async def test_largest_after_is_accepted(alice):
    """after=2**63-1 is still a valid seq: hello, nothing replayed, and the socket works."""
    cid = await new_client(alice)
    tab = await connect_tab(alice, cid, after=MAX_INT)
    assert tab.hello == {"type": "hello", "client_id": cid, "head": 0}
    await tab.send({"type": "ping"})
    assert await recv(tab) == {"type": "pong", "head": 0}
    await tab.disconnect()


async def test_unknown_client_is_refused_with_4404(alice):
    """A well-formed client id that names no client is 4404."""
    assert await refused_with(alice, f"client_id={random_id()}") == 4404
    assert await refused_with(alice, f"client_id={random_id()}&after=3") == 4404


async def test_deleted_client_is_refused_with_4404(alice):
    """A client deleted over HTTP cannot be connected again: 4404, and it is not recreated."""
    cid = await new_client(alice)
    await delete_client(alice, cid)
    assert await refused_with(alice, f"client_id={cid}") == 4404
    assert not await database_sync_to_async(Client.objects.filter(pk=cid).exists)()


async def test_another_users_client_is_refused_with_4403_and_not_attached(alice, bob):
    """Connecting to another user's client is 4403 and leaves its row unattached."""
    b1 = await new_client(bob)
    assert await refused_with(alice, f"client_id={b1}") == 4403
    assert await channel_of(b1) == ""


async def test_refused_socket_leaves_the_owners_socket_alone_and_is_inert(alice, bob):
    """A 4403 socket neither supersedes nor detaches the owner's socket, and cannot send."""
    b1 = await new_client(bob)
    owner = await connect_tab(bob, b1)
    channel = await channel_of(b1)
    assert channel != ""
    intruder = await open_ws(alice, f"client_id={b1}")
    assert await intruder.receive_output(TIMEOUT) == {"type": "websocket.close", "code": 4403}
    # Frames that reach the refused consumer before its disconnect are ignored.
    await intruder.send_json_to(send_frame("sneak", {"user": "alice"}, "as bob"))
    await intruder.send_json_to({"type": "ack", "seq": 1})
    assert await intruder.receive_nothing(timeout=0.3)
    await intruder.disconnect()
    assert await message_count() == 0
    assert await channel_of(b1) == channel
    assert await quiet(owner)  # no 4409, no frame
    await assert_usable(owner, me="bob")
    await owner.disconnect()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("anonymous+malformed", 4401),
        ("anonymous+unknown", 4401),
        ("anonymous+others", 4401),
        ("anonymous+others+malformed", 4401),
        ("malformed_after+others", 4400),
        ("malformed_after+unknown", 4400),
        ("malformed_after+deleted", 4400),
        ("deleted_others", 4404),
        ("others", 4403),
    ],
)
async def test_first_applicable_refusal_wins(alice, bob, case, expected):
    """When several refusals apply, the first of 4401, 4400, 4404, 4403 is the close code."""
    b1 = await new_client(bob)
    gone = await new_client(bob)
    await delete_client(bob, gone)
    queries = {
        "anonymous+malformed": (None, "client_id=nope&after=-1"),
        "anonymous+unknown": (None, f"client_id={random_id()}"),
        "anonymous+others": (None, f"client_id={b1}"),
        "anonymous+others+malformed": (None, f"client_id={b1}&after=abc"),
        "malformed_after+others": (alice, f"client_id={b1}&after=-1"),
        "malformed_after+unknown": (alice, f"client_id={random_id()}&after=1.5"),
        "malformed_after+deleted": (alice, f"client_id={gone}&after=x"),
        "deleted_others": (alice, f"client_id={gone}"),
        "others": (alice, f"client_id={b1}"),
    }
    user, query = queries[case]
    assert await refused_with(user, query) == expected
    assert await channel_of(b1) == ""


# -- the Origin check ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        None,
        b"http://evil.example",
        b"https://evil.example:443",
        b"http://localhost.evil.example",
        b"http://evil.example/localhost",
        b"null",
        b"",
    ],
    ids=lambda o: "none" if o is None else (o.decode() or "empty"),
)
async def test_foreign_or_missing_origin_is_refused_at_the_handshake(alice, origin):
    """A socket without an Origin header or from a host not in ALLOWED_HOSTS is never accepted."""
    cid = await new_client(alice)
    accepted, code, comm = await handshake(alice, f"client_id={cid}", origin)
    # The validator closes before accept: the communicator sees (False, 1000), daphne a 403.
    assert accepted is False, code
    await comm.disconnect()
    assert await channel_of(cid) == ""


@pytest.mark.parametrize(
    "origin",
    [
        b"http://127.0.0.1:1",
        b"https://localhost",
        b"https://localhost:8000",
        b"http://localhost:9",
        b"http://127.0.0.1",
        b"ws://localhost",
    ],
)
async def test_origin_of_another_scheme_or_port_is_refused(alice, origin):
    """The Origin must be this site's scheme://host[:port] (as Django's CSRF check compares it):
    an allowed host name on another scheme or port gets no socket."""
    cid = await new_client(alice)
    accepted, _, comm = await handshake(alice, f"client_id={cid}", origin)
    assert accepted is False
    await comm.disconnect()
    assert await channel_of(cid) == ""


@pytest.mark.parametrize(
    ("host", "origin", "scheme", "forwarded"),
    [
        (b"localhost", ORIGIN, "ws", None),
        (b"localhost:8000", b"http://localhost:8000", "ws", None),
        (b"127.0.0.1:8443", b"https://127.0.0.1:8443", "wss", None),
        (b"localhost", b"https://localhost", "ws", b"https"),  # behind the TLS proxy
        (b"localhost", b"https://app.example", "ws", None),  # CSRF_TRUSTED_ORIGINS
        (b"localhost", b"https://tab.sub.example:8443", "ws", None),  # a wildcard entry
    ],
)
async def test_origin_of_this_site_or_a_trusted_one_is_accepted(
    alice, settings, host, origin, scheme, forwarded
):
    """The request's own scheme://host[:port] (https behind SECURE_PROXY_SSL_HEADER) and the
    CSRF_TRUSTED_ORIGINS entries connect."""
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.CSRF_TRUSTED_ORIGINS = ["https://app.example", "https://*.sub.example:8443"]
    cid = await new_client(alice)
    cookie = await database_sync_to_async(session_cookie)(alice)
    headers = [(b"host", host), (b"origin", origin), (b"cookie", cookie.encode())]
    if forwarded is not None:
        headers.append((b"x-forwarded-proto", forwarded))
    comm = WebsocketCommunicator(application, f"/ws/?client_id={cid}", headers=headers)
    comm.scope["scheme"] = scheme
    accepted, _ = await comm.connect(timeout=TIMEOUT)
    assert accepted is True
    assert await comm.receive_json_from(TIMEOUT) == {"type": "hello", "client_id": cid, "head": 0}
    await comm.disconnect()


async def test_host_outside_allowed_hosts_is_refused_even_with_a_matching_origin(alice):
    """A Host not in ALLOWED_HOSTS gets no socket, whatever its Origin says."""
    cid = await new_client(alice)
    cookie = await database_sync_to_async(session_cookie)(alice)
    headers = [
        (b"host", b"evil.example"),
        (b"origin", b"http://evil.example"),
        (b"cookie", cookie.encode()),
    ]
    comm = WebsocketCommunicator(application, f"/ws/?client_id={cid}", headers=headers)
    accepted, _ = await comm.connect(timeout=TIMEOUT)
    assert accepted is False
    await comm.disconnect()


# -- bad frames: an error frame each, and the socket stays usable ----------------------------

DEEP = "[" * 10_000 + "]" * 10_000
SEND_PREFIX = '{"type":"send","client_msg_id":"c1","to":{"user":"alice"},"body":'

BAD_TEXT_FRAMES = [
    ("not-json", "{not json", "malformed_json"),
    ("truncated", '{"type":"send","client_msg_id":"c1"', "malformed_json"),
    ("empty-text", " ", "malformed_json"),
    ("trailing-garbage", '{"type":"ping"} x', "malformed_json"),
    ("array", '[{"type":"ping"}]', "malformed"),
    ("number", "42", "malformed"),
    ("string", '"ping"', "malformed"),
    ("null", "null", "malformed"),
    ("true", "true", "malformed"),
    ("missing-type", "{}", "unknown_type"),
    ("null-type", '{"type":null}', "unknown_type"),
    ("unknown-type", '{"type":"shout"}', "unknown_type"),
    ("case-type", '{"type":"PING"}', "unknown_type"),
    ("list-type", '{"type":["send"]}', "unknown_type"),
    ("object-type", '{"type":{"send":1}}', "unknown_type"),
    ("number-type", '{"type":1}', "unknown_type"),
    ("nan", SEND_PREFIX + "NaN}", "malformed_json"),
    ("infinity", SEND_PREFIX + "Infinity}", "malformed_json"),
    ("minus-infinity", SEND_PREFIX + "[-Infinity]}", "malformed_json"),
    ("deep-frame", DEEP, "malformed_json"),
    ("deep-object-frame", '{"a":' * 10_000 + "1" + "}" * 10_000, "malformed_json"),
    ("deep-body", SEND_PREFIX + DEEP + "}", "malformed_json"),
]


@pytest.mark.parametrize(
    "text, code", [(t, c) for _, t, c in BAD_TEXT_FRAMES], ids=[i for i, _, _ in BAD_TEXT_FRAMES]
)
async def test_bad_text_frame_gets_error_and_socket_stays_usable(alice, text, code):
    """A frame that is not a JSON object of a known type gets an error frame; the socket lives."""
    tab = await connect_tab(alice, await new_client(alice))
    await tab.send_text(text)
    await expect_error(tab, code)
    assert await message_count() == 0
    await assert_usable(tab)
    await tab.disconnect()


async def test_binary_frame_gets_error_and_socket_stays_usable(alice):
    """A binary frame (even one holding valid JSON) is answered with an error, not a 1011."""
    tab = await connect_tab(alice, await new_client(alice))
    raw = json.dumps(send_frame("bin", {"user": "alice"}, 1)).encode()
    await tab.comm.send_to(bytes_data=raw)
    await expect_error(tab, "malformed")
    await tab.comm.send_to(bytes_data=b"\xff\x00\xfe")
    await expect_error(tab, "malformed")
    assert await message_count() == 0
    await assert_usable(tab)
    await tab.disconnect()


BAD_SENDS = [
    # (id, frame fields replacing the valid ones (ABSENT: dropped), code, echoed client_msg_id)
    ("no-cmid", {"client_msg_id": ABSENT}, "invalid_client_msg_id", ABSENT),
    ("null-cmid", {"client_msg_id": None}, "invalid_client_msg_id", ABSENT),
    ("int-cmid", {"client_msg_id": 7}, "invalid_client_msg_id", ABSENT),
    ("bool-cmid", {"client_msg_id": True}, "invalid_client_msg_id", ABSENT),
    ("list-cmid", {"client_msg_id": ["c"]}, "invalid_client_msg_id", ABSENT),
    ("object-cmid", {"client_msg_id": {"id": "c"}}, "invalid_client_msg_id", ABSENT),
    ("empty-cmid", {"client_msg_id": ""}, "invalid_client_msg_id", ""),
    ("long-cmid", {"client_msg_id": "x" * 101}, "invalid_client_msg_id", "x" * 101),
    ("nul-cmid", {"client_msg_id": "a\x00b"}, "invalid_client_msg_id", "a\x00b"),
    ("surrogate-cmid", {"client_msg_id": "a\ud800"}, "invalid_client_msg_id", "a\ud800"),
    ("no-body", {"body": ABSENT}, "invalid_body", "c1"),
    ("no-to", {"to": ABSENT}, "invalid_to", "c1"),
    ("null-to", {"to": None}, "invalid_to", "c1"),
    ("empty-to", {"to": {}}, "invalid_to", "c1"),
    ("int-user", {"to": {"user": 5}}, "invalid_to", "c1"),
    ("null-user", {"to": {"user": None}}, "invalid_to", "c1"),
    ("empty-user", {"to": {"user": ""}}, "invalid_to", "c1"),
    ("long-user", {"to": {"user": "u" * 151}}, "invalid_to", "c1"),
    ("user-and-room", {"to": {"user": "alice", "room": "y"}}, "invalid_to", "c1"),
    ("string-to", {"to": "bob"}, "invalid_to", "c1"),
    ("list-to", {"to": ["bob"]}, "invalid_to", "c1"),
    ("other-key-to", {"to": {"group": "x"}}, "invalid_to", "c1"),
    ("int-room", {"to": {"room": 5}}, "invalid_room", "c1"),
    ("bad-room-name", {"to": {"room": "no spaces!"}}, "invalid_room", "c1"),
    ("unknown-user", {"to": {"user": "nobody"}}, "unknown_user", "c1"),
    ("unknown-room", {"to": {"room": "nowhere"}}, "unknown_room", "c1"),
]


@pytest.mark.parametrize(
    "fields, code, cmid", [b[1:] for b in BAD_SENDS], ids=[b[0] for b in BAD_SENDS]
)
async def test_bad_send_gets_error_stores_nothing_and_socket_stays_usable(
    alice, bob, fields, code, cmid
):
    """An invalid send is answered by an error frame with a stable code (and its string
    client_msg_id), stores nothing, and the socket keeps working."""
    tab = await connect_tab(alice, await new_client(alice))
    b1 = await new_client(bob)
    frame = send_frame("c1", {"user": "bob"}, {"text": "hi"})
    for key, value in fields.items():
        if value is ABSENT:
            del frame[key]
        else:
            frame[key] = value
    await tab.send(frame)
    await expect_error(tab, code, cmid)
    assert await message_count() == 0
    assert await queue_of(b1) == []
    await assert_usable(tab)
    await tab.disconnect()


async def test_number_beyond_a_double_in_body_is_invalid_body(alice):
    """1e400 is JSON but no finite number: the send is refused with invalid_body, not stored as
    Infinity."""
    tab = await connect_tab(alice, await new_client(alice))
    await tab.send_text(SEND_PREFIX + '{"n":1e400}}')
    await expect_error(tab, "invalid_body", "c1")
    assert await message_count() == 0
    await assert_usable(tab)
    await tab.disconnect()


async def test_send_to_room_of_which_sender_is_not_a_member_is_refused(alice, bob):
    """Posting to a room one is not a member of is not_a_member, and members get nothing."""
    await make_room(bob, "bobs")
    b1 = await new_client(bob)
    tb = await connect_tab(bob, b1)
    ta = await connect_tab(alice, await new_client(alice))
    await ta.send(send_frame("r1", {"room": "bobs"}, "let me in"))
    await expect_error(ta, "not_a_member", "r1")
    assert await message_count() == 0
    assert await quiet(tb)
    assert await queue_of(b1) == []
    await assert_usable(ta)
    await ta.disconnect()
    await tb.disconnect()


async def test_body_over_the_limit_is_refused_with_body_too_large(alice, settings):
    """A body over MESSAGING_MAX_BODY_BYTES (compact UTF-8 JSON) is body_too_large; at the limit
    it is stored."""
    settings.MESSAGING_MAX_BODY_BYTES = 64
    tab = await connect_tab(alice, await new_client(alice))
    at_limit = "x" * 62  # '"xx…"' is 64 bytes
    await tab.send(send_frame("big", {"user": "alice"}, at_limit + "x"))
    await expect_error(tab, "body_too_large", "big")
    # Non-ASCII counts in UTF-8 bytes (2 for é), not in characters nor in \u escapes.
    await tab.send(send_frame("big-e", {"user": "alice"}, "é" * 32))
    await expect_error(tab, "body_too_large", "big-e")
    assert await message_count() == 0
    await tab.send(send_frame("fits", {"user": "alice"}, at_limit))
    await tab.send(send_frame("fits-e", {"user": "alice"}, "é" * 31))
    frames = [await recv(tab) for _ in range(4)]
    assert sorted(f["client_msg_id"] for f in frames if f["type"] == "sent") == ["fits", "fits-e"]
    bodies = [f["message"]["body"] for f in frames if f["type"] == "delivery"]
    assert bodies == [at_limit, "é" * 31]
    await assert_usable(tab)
    await tab.disconnect()


async def test_longest_client_msg_id_is_accepted(alice):
    """A client_msg_id of exactly 100 characters is valid."""
    tab = await connect_tab(alice, await new_client(alice))
    cmid = "z" * 100
    await tab.send(send_frame(cmid, {"user": "alice"}, 1))
    sent = await tab.recv_type("sent")
    assert sent["client_msg_id"] == cmid and sent["duplicate"] is False
    await tab.disconnect()


async def test_nul_and_lone_surrogates_in_body_round_trip_intact(alice, bob):
    """NUL characters and lone surrogates inside a body are stored and delivered back unchanged."""
    ta = await connect_tab(alice, await new_client(alice))
    tb = await connect_tab(bob, await new_client(bob))
    body = {
        "nul": "a\x00b",
        "only_nul": "\x00",
        "high": "x\ud800y",
        "low": "\udfff",
        "reversed_pair": "\udc00\ud800",
        "pair": "\U0001f600",
        "key\x00\ud801": ["\x00", "\udbff", {"\ud800": "\x00"}],
    }
    # Escaped (\u0000, \ud800) as JSON text.
    await ta.send(send_frame("odd", {"user": "bob"}, body))
    sent, mine = await sent_and_delivery(ta)
    assert sent["duplicate"] is False
    (theirs,) = await tb.deliveries(1)
    assert mine["message"]["body"] == body
    assert theirs["message"]["body"] == body
    assert theirs["message"]["id"] == sent["id"]
    # A reconnect replays it from the database, still intact.
    await tb.disconnect()
    tb = await connect_tab(bob, tb.client_id)
    (replayed,) = await tb.deliveries(1)
    assert replayed["message"]["body"] == body
    await assert_usable(ta)
    await ta.disconnect()
    await tb.disconnect()


async def test_deeply_nested_but_parseable_body_round_trips(alice):
    """A body nested a few hundred levels deep is stored and delivered intact."""
    tab = await connect_tab(alice, await new_client(alice))
    body: object = "core"
    for _ in range(300):
        body = [body]
    await tab.send(send_frame("nest", {"user": "alice"}, body))
    (frame,) = await tab.deliveries(1)
    assert frame["message"]["body"] == body
    await tab.disconnect()


BAD_ACKS = [
    ("missing", ABSENT),
    ("null", None),
    ("string", "1"),
    ("float", 1.0),
    ("fraction", 1.5),
    ("true", True),
    ("false", False),
    ("negative", -1),
    ("too-big", 2**63),
    ("list", [1]),
]


@pytest.mark.parametrize("seq", [s for _, s in BAD_ACKS], ids=[i for i, _ in BAD_ACKS])
async def test_malformed_ack_gets_error_and_deletes_nothing(alice, seq):
    """An ack whose seq is not a non-negative JSON integer gets invalid_seq and acks nothing."""
    cid = await new_client(alice)
    tab = await connect_tab(alice, cid)
    await tab.send(send_frame("m", {"user": "alice"}, 1))
    await sent_and_delivery(tab)
    frame = {"type": "ack"} if seq is ABSENT else {"type": "ack", "seq": seq}
    await tab.send(frame)
    await expect_error(tab, "invalid_seq")
    assert await queue_of(cid) == [1]
    assert (await database_sync_to_async(Client.objects.get)(pk=cid)).acked_seq == 0
    await assert_usable(tab)
    await tab.send({"type": "ack", "seq": 2})  # a good ack still works and has no reply
    assert await quiet(tab)
    assert await queue_of(cid) == []
    await tab.disconnect()


# -- rate limit ------------------------------------------------------------------------------


async def test_send_over_the_rate_gets_rate_limited_and_a_later_retry_is_stored(alice, settings):
    """Past the burst a send gets rate_limited with its client_msg_id and stores nothing; the
    same send retried after the bucket refills is stored and delivered."""
    settings.MESSAGING_SEND_RATE = 1.0
    settings.MESSAGING_SEND_BURST = 2
    cid = await new_client(alice)
    tab = await connect_tab(alice, cid)
    for i in range(3):
        await tab.send(send_frame(f"r{i}", {"user": "alice"}, i))
    frames = [await recv(tab) for _ in range(5)]  # 2 sent, 2 deliveries, 1 error
    errors = [f for f in frames if f["type"] == "error"]
    assert len(errors) == 1, frames
    assert errors[0]["code"] == "rate_limited" and errors[0]["client_msg_id"] == "r2"
    assert isinstance(errors[0]["detail"], str) and errors[0]["detail"]
    assert sorted(f["client_msg_id"] for f in frames if f["type"] == "sent") == ["r0", "r1"]
    assert await quiet(tab)
    assert await message_count() == 2
    await asyncio.sleep(1.1)  # one token back at 1/s
    await tab.send(send_frame("r2", {"user": "alice"}, 2))
    sent, delivery = await sent_and_delivery(tab)
    assert sent["client_msg_id"] == "r2" and sent["duplicate"] is False
    assert delivery["seq"] == 3 and delivery["message"]["body"] == 2
    assert await message_count() == 3
    await tab.disconnect()


# -- typing ----------------------------------------------------------------------------------


async def test_typing_reaches_other_members_only(alice, bob, carol):
    """A member's typing frame reaches every socket of the other members, not the typer's own
    tabs nor non-members, and is never queued."""
    await make_room(alice, "lobby", bob)
    a1, a2 = await new_client(alice), await new_client(alice)
    b1, b2 = await new_client(bob), await new_client(bob)
    c1 = await new_client(carol)
    ta1, ta2 = await connect_tab(alice, a1), await connect_tab(alice, a2)
    tb1, tb2 = await connect_tab(bob, b1), await connect_tab(bob, b2)
    tc = await connect_tab(carol, c1)
    await ta1.send({"type": "typing", "room": "lobby"})
    for tab in (tb1, tb2):
        assert await recv(tab) == {"type": "typing", "room": "lobby", "user": "alice"}
    for tab in (ta1, ta2, tc, tb1, tb2):
        assert await quiet(tab)
    assert await queue_of(b1) == [] and await queue_of(b2) == []
    for tab in (ta1, ta2, tb1, tb2, tc):
        await tab.disconnect()


BAD_TYPING = [
    ("no-room", ABSENT, "invalid_room"),
    ("null-room", None, "invalid_room"),
    ("int-room", 5, "invalid_room"),
    ("object-room", {"room": "lobby"}, "invalid_room"),
    ("bad-name", "lob by", "invalid_room"),
    ("unknown-room", "nowhere", "unknown_room"),
    ("not-a-member", "bobs", "not_a_member"),
]


@pytest.mark.parametrize("room, code", [b[1:] for b in BAD_TYPING], ids=[b[0] for b in BAD_TYPING])
async def test_typing_with_a_bad_room_gets_error_and_reaches_nobody(alice, bob, room, code):
    """typing for a malformed, unknown or foreign room is an error frame and notifies nobody."""
    await make_room(bob, "bobs")
    tb = await connect_tab(bob, await new_client(bob))
    ta = await connect_tab(alice, await new_client(alice))
    await ta.send({"type": "typing"} if room is ABSENT else {"type": "typing", "room": room})
    await expect_error(ta, code)
    assert await quiet(tb)
    await assert_usable(ta)
    await ta.disconnect()
    await tb.disconnect()
