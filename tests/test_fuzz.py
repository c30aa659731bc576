"""Property-based fuzzing (hypothesis) of every input the server accepts: WebSocket frames, the
WebSocket query string and Origin header, and every HTTP endpoint's body, query string, path and
headers. A client can send anything; the server answers with the protocol's errors, never a crash.

Runs are bounded and derandomized (the same examples on every run and in CI). The examples of one
test share one world (users, clients, open sockets), so the WebSocket tests do not shrink: after a
real failure every later example may fail too, and shrinking would report a misleading one; the
first failing example is reported as found.
"""

import json
import re
import time
import uuid
from urllib.parse import quote, urlparse, urlsplit

import hypothesis
import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.exceptions import TooManyFieldsSent
from django.http import QueryDict
from hypothesis import HealthCheck, Phase, assume, event, given, note
from hypothesis import strategies as st

from chatproject.asgi import application
from clients.errors import Malformed
from clients.models import Client
from messaging.models import Message
from messaging.wire import parse_json
from tests.conftest import (
    HOST,
    ORIGIN,
    TIMEOUT,
    api_post,
    connect_tab,
    http_as,
    register,
    session_cookie,
)

MAX_INT = 2**63 - 1
MAX_DEPTH = 512  # the protocol's JSON nesting limit (docs/protocol.md)
USERS = ("alice", "bob")
ROOM_NAME = re.compile(r"[\w.-]{1,64}")
HANDLERS = ("send", "ack", "ping", "typing")
REFUSALS = {4400, 4401, 4403, 4404}
PROMPT = 2.0  # seconds: the longest one bad input may take to be answered
ABSENT = object()

# Every error code the server may answer with (docs/protocol.md "Validation error codes", plus
# the HTTP edges); anything else, internal_error above all, is a failure.
CODES = set(
    "malformed_json malformed unknown_type invalid_client_msg_id invalid_client_id invalid_to"
    " invalid_room invalid_body invalid_seq invalid_after invalid_limit invalid_before"
    " body_too_large rate_limited unknown_client not_your_client unknown_user unknown_room"
    " not_a_member room_exists csrf_failed not_authenticated method_not_allowed not_found".split()
)

_COMMON = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
}
WS_FUZZ = hypothesis.settings(max_examples=100, phases=[Phase.explicit, Phase.generate], **_COMMON)
HTTP_FUZZ = hypothesis.settings(max_examples=200, **_COMMON)


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """
    Users are created per test and no password is ever checked: hash them cheaply.
    """
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


# -- strategies: JSON values -------------------------------------------------------------------

# fmt: off
SPECIAL_TEXT = st.sampled_from(
    ["", " ", "\x00", "a\x00b", "\ud800", "\udfff", "x\udbff\udc00y", "\U0001f600", "\u202e",
     "\ufeff", "é", "日本語", "alice", "Alice", "bob ", "fuzz", "private", "nowhere", "null", "0",
     "-1", "1e3", "NaN", "%00", "%ff", "\\", '"', "[", "{", "x" * 100, "x" * 101, "r" * 64,
     "r" * 65, "u" * 151]
)
# fmt: on
TEXT = st.text(st.characters(exclude_categories=()), max_size=30) | SPECIAL_TEXT
INTS = st.integers() | st.sampled_from(
    [0, 1, -1, MAX_INT, MAX_INT + 1, 2**64, -(2**63) - 1, 10**30]
)
SCALARS = st.none() | st.booleans() | INTS | st.floats(allow_nan=False, allow_infinity=False) | TEXT
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=10,
)


def _nest(depth: int, in_object: bool) -> object:
    value: object = "core"
    for _ in range(depth):
        value = {"k": value} if in_object else [value]
    return value


# Over the body limit, under daphne's 1 MiB frame limit; and nested but still parseable.
HUGE_TEXT = st.sampled_from(["x", "é", "\ud800", "\x00"]).flatmap(
    lambda c: st.integers(70_000, 200_000).map(lambda n: c * n)
)
NESTED = st.builds(_nest, st.integers(50, 450), st.booleans())
ANY_VALUE = JSON_VALUES | HUGE_TEXT | NESTED


def good_text(value: object, max_length: int) -> bool:
    """
    The protocol's storable string: 1 to max_length characters, no NUL, no lone surrogate.
    """
    if not isinstance(value, str) or not 1 <= len(value) <= max_length or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def good_seq(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_INT


def room_code(room: object) -> str | None:
    """
    The error for `room` as a room alice posts or types in; None if she may.
    """
    if not isinstance(room, str) or not ROOM_NAME.fullmatch(room):
        return "invalid_room"
    return {"fuzz": None, "private": "not_a_member"}.get(room, "unknown_room")


def to_code(to: object) -> str | None:
    """
    The error for `to` as the target of alice's send; None if it is deliverable.
    """
    if not isinstance(to, dict) or len(to) != 1 or not {"user", "room"} & to.keys():
        return "invalid_to"
    ((kind, name),) = to.items()
    if kind == "room":
        return room_code(name)
    if not good_text(name, 150):
        return "invalid_to"
    return None if name in USERS else "unknown_user"


# -- strategies: WebSocket frames --------------------------------------------------------------


def extras(*reserved: str):
    """
    Unknown fields a frame may carry (the server ignores them).
    """
    keys = TEXT.filter(lambda k: k not in reserved and k != "type")
    return st.dictionaries(keys, JSON_VALUES, max_size=2)


def with_field(frame: dict, name: str, value: object) -> dict:
    if value is not ABSENT:
        frame[name] = value
    return frame


OK_SEND = {"client_msg_id": "c1", "to": {"room": "fuzz"}, "body": {"text": "hi"}}


@st.composite
def bad_sends(draw) -> tuple[dict, str]:
    """
    A send frame with exactly one bad field, and the error code it must get.
    """
    field = draw(st.sampled_from(["client_msg_id", "to", "body"]))
    frame = {"type": "send", **draw(extras(*OK_SEND)), **OK_SEND}
    del frame[field]
    if field == "client_msg_id":
        value = draw(st.just(ABSENT) | ANY_VALUE.filter(lambda v: not good_text(v, 100)))
        code = "invalid_client_msg_id"
    elif field == "to":
        targets = st.dictionaries(st.sampled_from(["user", "room", "group"]), ANY_VALUE, max_size=2)
        value = draw(st.just(ABSENT) | ANY_VALUE | targets)
        code = to_code(None if value is ABSENT else value)
        assume(code is not None)
    else:
        value = draw(st.just(ABSENT) | HUGE_TEXT | st.lists(HUGE_TEXT, min_size=1, max_size=2))
        code = "invalid_body" if value is ABSENT else "body_too_large"
    return with_field(frame, field, value), code


@st.composite
def bad_acks(draw) -> tuple[dict, str]:
    seq = draw(st.just(ABSENT) | ANY_VALUE.filter(lambda v: not good_seq(v)))
    return with_field({"type": "ack", **draw(extras("seq"))}, "seq", seq), "invalid_seq"


@st.composite
def bad_typings(draw) -> tuple[dict, str]:
    room = draw(st.just(ABSENT) | ANY_VALUE.filter(lambda v: room_code(v) is not None))
    code = room_code(None if room is ABSENT else room)
    return with_field({"type": "typing", **draw(extras("room"))}, "room", room), code


@st.composite
def bad_types(draw) -> tuple[dict, str]:
    kind = draw(st.just(ABSENT) | ANY_VALUE.filter(lambda v: v not in HANDLERS))
    base = draw(st.sampled_from([{}, OK_SEND, {"seq": 0}, {"room": "fuzz"}]))
    return with_field({**draw(extras(*base)), **base}, "type", kind), "unknown_type"


BAD_FRAMES = bad_sends() | bad_acks() | bad_typings() | bad_types()

_SPECIAL_CHARS = re.compile(r'[\[\]{}"\\]')


def json_depth(text: str) -> int:
    """
    The deepest bracket nesting of a JSON text outside strings (an independent, linear scan).
    """
    depth = deepest = 0
    in_string = False
    escaped_at = -1
    for match in _SPECIAL_CHARS.finditer(text):
        at, char = match.start(), match.group()
        if in_string:
            if at == escaped_at:
                continue
            if char == "\\":
                escaped_at = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _no_constants(name: str) -> object:
    raise ValueError(name)


def strict_json(text: str) -> tuple[bool, object]:
    """
    (True, value) when `text` is strict JSON (no NaN or Infinity) nested at most 512 levels,
    else (False, None).
    """
    if json_depth(text) > MAX_DEPTH:
        return False, None  # and json.loads must not recurse that deep in this process
    try:
        return True, json.loads(text, parse_constant=_no_constants)
    except ValueError:
        return False, None


def text_frame_code(text: str) -> str | None:
    """
    The error code a text frame must get when it is not a JSON object of a known type; None if
    it is one (the typed strategies cover those).
    """
    ok, value = strict_json(text)
    if not ok:
        return "malformed_json"
    if not isinstance(value, dict):
        return "malformed"
    kind = value.get("type")
    return None if isinstance(kind, str) and kind in HANDLERS else "unknown_type"


SEND_PREFIX = '{"type":"send","client_msg_id":"c1","to":{"room":"fuzz"},"body":'
# Pieces that JSON scanners trip over: brackets, quotes, escapes, and long runs of them.
SOUP_TOKENS = ["[", "]", "{", "}", '"', '\\"', "\\", "\\\\", ",", ":", "a", "1", " ", '{"a":']
SOUP = st.lists(
    st.tuples(st.sampled_from(SOUP_TOKENS), st.integers(1, 30_000)), min_size=1, max_size=5
).map(lambda runs: "".join(token * count for token, count in runs))
# An opening, a long run of one string-ish token, then many brackets: the shape that makes a
# backtracking scanner quadratic. Run lengths are spread evenly over orders of magnitude.
SCANNER_TRAPS = st.builds(
    lambda head, run, count, tail, depth: head + run * count + tail * depth,
    st.sampled_from(["", '"', '["', '{"a":"', SEND_PREFIX, SEND_PREFIX + '"']),
    st.sampled_from(['\\"', "\\", "\\\\", '"', "a", "\\u", ' "', '"a"']),
    st.integers(0, 16).map(lambda bits: 2**bits),
    st.sampled_from(["[", "{", '{"a":', "]", "[]"]),
    st.sampled_from([1, 100, MAX_DEPTH, MAX_DEPTH + 1, 2_000]),
)


@st.composite
def mutated_frames(draw) -> str:
    """
    A valid frame's text with a cut, a deletion or an insertion somewhere.
    """
    frame = draw(st.sampled_from([{"type": kind, **OK_SEND} for kind in HANDLERS]))
    text = json.dumps(frame, ensure_ascii=draw(st.booleans()))
    at = draw(st.integers(0, len(text)))
    how = draw(st.sampled_from(["cut", "delete", "insert"]))
    if how == "cut":
        return text[:at]
    if how == "delete":
        return text[:at] + text[at + 1 :]
    return text[:at] + draw(TEXT | st.sampled_from(['"', "\\", "NaN", "]", "}"])) + text[at:]


DEEP_TEXT = st.builds(
    lambda n, opener, wrap: (
        (SEND_PREFIX if wrap else "")
        + (("[" * n + "]" * n) if opener == "[" else ('{"a":' * n + "1" + "}" * n))
        + ("}" if wrap else "")
    ),
    st.integers(MAX_DEPTH + 1, 60_000),
    st.sampled_from(["[", "{"]),
    st.booleans(),
)
BAD_LITERALS = st.sampled_from(["NaN", "Infinity", "-Infinity", "[NaN]", '{"a":-Infinity}']).map(
    lambda literal: SEND_PREFIX + literal + "}"
)
RAW_TEXT = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=60),
    mutated_frames(),
    DEEP_TEXT,
    SOUP,
    SCANNER_TRAPS,
    BAD_LITERALS,
    JSON_VALUES.filter(lambda v: not isinstance(v, dict)).map(json.dumps),
)


@hypothesis.settings(max_examples=300, **_COMMON)
@given(text=SCANNER_TRAPS | SOUP | DEEP_TEXT | mutated_frames() | TEXT, as_bytes=st.booleans())
def test_parsing_any_text_is_prompt_and_agrees_with_json(text, as_bytes):
    """The strict JSON parser behind every frame and request body answers any text (up to 1 MiB)
    within a fraction of a second: the value json.loads gives, or malformed_json when the text is
    not JSON, has NaN/Infinity, or nests deeper than 512 levels."""
    raw = text.encode("utf-8", "surrogatepass") if as_bytes else text
    started = time.monotonic()
    try:
        value, code = parse_json(raw), None
    except Malformed as exc:
        value, code = None, exc.code
    elapsed = time.monotonic() - started
    assert elapsed < PROMPT / 4, f"{len(text)} characters took {elapsed:.2f}s"
    try:
        ok, expected = strict_json(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except UnicodeDecodeError:
        ok, expected = False, None
    if ok:
        assert code is None and value == expected
    else:
        assert code == "malformed_json", value


# -- the WebSocket world -----------------------------------------------------------------------


@database_sync_to_async
def _make_rooms(alice, bob) -> None:
    ha, hb = http_as(alice), http_as(bob)
    for http, name in ((ha, "fuzz"), (hb, "private")):
        assert api_post(http, "/api/rooms/", {"name": name}).status_code == 201
    assert api_post(hb, "/api/rooms/fuzz/join").status_code == 200


@database_sync_to_async
def _clients(alice, bob) -> tuple[str, str, str]:
    return register(http_as(alice)), register(http_as(alice)), register(http_as(bob))


@database_sync_to_async
def message_count() -> int:
    return Message.objects.count()


class WsWorld:
    """
    Alice's fuzzing tab, her well-behaved second tab and bob's tab, all in room "fuzz".
    """

    def __init__(self, fuzzer, witness, peer) -> None:
        self.fuzzer = fuzzer
        self.witness = witness
        self.peer = peer
        self.stored = 0

    @staticmethod
    async def next_frame(tab) -> dict:
        """
        The next frame that is not `presence` (peers come and go at connect).
        """
        while True:
            frame = await tab.recv(TIMEOUT)
            if frame.get("type") != "presence":
                return frame

    async def expect_error(self, code: str, frame: object) -> None:
        """
        The fuzzing tab's next frame is exactly the error `code`, echoing a string
        client_msg_id of a parsed frame.
        """
        got = await self.next_frame(self.fuzzer)
        note(f"answer: {str(got)[:300]}")
        assert got.get("type") == "error", got
        assert got["code"] == code, got
        assert isinstance(got["detail"], str) and got["detail"], got
        cmid = frame.get("client_msg_id") if isinstance(frame, dict) else None
        if isinstance(cmid, str):
            assert set(got) == {"type", "code", "detail", "client_msg_id"}, got
            assert got["client_msg_id"] == cmid
        else:
            assert set(got) == {"type", "code", "detail"}, got

    async def still_works(self) -> None:
        """
        Nothing was stored, the fuzzing socket answers a ping, and a valid message it sends
        next reaches every tab exactly once, in seq order.
        """
        assert await message_count() == self.stored
        await self.fuzzer.send({"type": "ping"})
        assert await self.next_frame(self.fuzzer) == {"type": "pong", "head": self.stored}
        self.stored += 1
        cmid = f"ok-{self.stored}"
        await self.fuzzer.send(
            {"type": "send", "client_msg_id": cmid, "to": {"room": "fuzz"}, "body": self.stored}
        )
        first, second = await self.next_frame(self.fuzzer), await self.next_frame(self.fuzzer)
        sent, own = sorted((first, second), key=lambda f: f["type"] != "sent")
        assert sent == {"type": "sent", "client_msg_id": cmid, "id": sent["id"], "duplicate": False}
        for frame in (own, await self.next_frame(self.witness), await self.next_frame(self.peer)):
            assert frame["type"] == "delivery", frame
            assert frame["seq"] == self.stored, frame
            assert frame["message"]["id"] == sent["id"], frame
            assert frame["message"]["body"] == self.stored, frame


@pytest.fixture
async def ws_world(alice, bob, settings):
    """
    Three connected tabs; the send, ping and typing bounds are off since the examples share
    one socket (tests/test_bounds.py tests those).
    """
    settings.MESSAGING_SEND_RATE = settings.MESSAGING_USER_SEND_RATE = None
    settings.MESSAGING_PING_RATE = settings.MESSAGING_TYPING_INTERVAL = None
    await _make_rooms(alice, bob)
    a1, a2, b1 = await _clients(alice, bob)
    world = WsWorld(
        await connect_tab(alice, a1), await connect_tab(alice, a2), await connect_tab(bob, b1)
    )
    yield world
    for tab in (world.fuzzer, world.witness, world.peer):
        # Exactly once: no frame beyond the ones each example read (presence aside).
        while not await tab.nothing(0.2):
            extra = await tab.recv()
            assert extra.get("type") == "presence", extra
        await close(tab.comm)


# -- WebSocket frames --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@WS_FUZZ
@given(case=BAD_FRAMES, ascii_only=st.booleans())
async def test_frames_with_a_bad_field_get_their_error_and_break_nothing(
    ws_world, case, ascii_only
):
    """A send/ack/typing/unknown frame with one field of any wrong type or value gets an error
    frame with that field's stable code; nothing is stored, the socket stays open, and every tab
    still gets the next valid message exactly once."""
    frame, code = case
    text = json.dumps(frame, ensure_ascii=ascii_only)
    note(f"frame: {text[:300]}")
    await ws_world.fuzzer.send_text(text)
    await ws_world.expect_error(code, frame)
    await ws_world.still_works()


@pytest.mark.django_db(transaction=True)
@WS_FUZZ
@given(text=RAW_TEXT)
async def test_any_text_frame_that_is_no_valid_frame_gets_an_error(ws_world, text):
    """Invalid JSON, JSON that is not an object, NaN, nesting past 512 levels and scanner-hostile
    text get malformed_json / malformed / unknown_type (or the field's code), promptly, and the
    socket and the other tabs carry on."""
    code = text_frame_code(text)
    parsed = strict_json(text)[1]
    # A mutation may leave a valid send: storing it is right, and not what this test is about.
    assume(code is not None or parsed.get("type") != "send")
    note(f"frame ({len(text)} chars): {text[:300]!r}")
    started = time.monotonic()
    await ws_world.fuzzer.comm.send_input({"type": "websocket.receive", "text": text})
    if code is None:
        # A known frame type with a missing field (ack, typing) or a ping: its usual answer.
        got = await ws_world.next_frame(ws_world.fuzzer)
        if parsed["type"] == "ping":
            assert got == {"type": "pong", "head": ws_world.stored}, got
        else:
            assert got["type"] == "error" and got["code"] in CODES, got
    else:
        await ws_world.expect_error(code, parsed)
    # One frame must not hold the event loop (every socket of the process) for long.
    assert time.monotonic() - started < PROMPT, f"answered after {time.monotonic() - started:.1f}s"
    await ws_world.still_works()


@pytest.mark.django_db(transaction=True)
@WS_FUZZ
@given(data=st.binary(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
async def test_binary_frames_get_malformed_and_break_nothing(ws_world, data):
    """Any binary frame (even valid JSON, even empty) is answered `malformed`; the socket lives."""
    await ws_world.fuzzer.comm.send_input({"type": "websocket.receive", "bytes": data})
    await ws_world.expect_error("malformed", None)
    await ws_world.still_works()


@pytest.mark.django_db(transaction=True)
@WS_FUZZ
@given(junk=extras(), kind=st.sampled_from(["ping", "ack"]))
async def test_valid_frames_with_unknown_fields_still_work(ws_world, junk, kind):
    """Unknown fields are ignored: a ping with junk is answered, an ack with junk has no reply."""
    frame = {**junk, "type": kind} | ({"seq": 0} if kind == "ack" else {})
    await ws_world.fuzzer.send(frame)
    if kind == "ping":
        assert await ws_world.next_frame(ws_world.fuzzer) == {
            "type": "pong",
            "head": ws_world.stored,
        }
    await ws_world.still_works()


# -- WebSocket query string and Origin ---------------------------------------------------------


CLIENT_IDS = st.tuples(
    st.sampled_from([b"{own}", b"{bob}", b"{gone}", b"{unknown}"]),
    st.sampled_from(["{}", "{}", "{{{}}}", "urn:uuid:{}", "{}x", "%s"]),
)
# fmt: off
QUERY_PIECES = st.one_of(
    st.sampled_from(
        [b"client_id=", b"after=", b"&", b"=", b";", b"+", b"%", b"%00", b"%ff", b"%2B1",
         b"%20", b"%D9%A1", b"\xd9\xa1", b"\xff", b"\x00", b"client_id", b"after",
         b"CLIENT_ID=", b"0", b"-1", b"1.5", b"1e3", b"00", str(MAX_INT).encode(),
         str(MAX_INT + 1).encode(), b"9" * 40]
    ),
    CLIENT_IDS,
    st.binary(max_size=6),
    TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")),
    TEXT.map(lambda s: quote(s.encode("utf-8", "surrogatepass")).encode()),
)
# fmt: on


AFTER_VALUES = st.sampled_from(
    [b"0", b"3", b"00", str(MAX_INT).encode(), str(MAX_INT + 1).encode(), b"-1", b"", b"%30"]
)


@st.composite
def ws_queries(draw) -> list:
    """
    Query strings built from protocol words, client ids of every kind, and garbage: mostly
    `client_id=...[&after=...]` with `&`-separated extras (a later key wins), else free-form.
    """
    if draw(st.integers(0, 2)):
        pieces: list = [b"client_id=", draw(CLIENT_IDS)]
        if draw(st.booleans()):
            pieces += [b"&after=", draw(AFTER_VALUES | QUERY_PIECES)]
        for extra in draw(st.just([]) | st.lists(QUERY_PIECES, max_size=3)):
            pieces += [b"&", extra]
        return pieces
    return draw(st.lists(QUERY_PIECES, max_size=10))


@database_sync_to_async
def _query_world(alice, bob) -> dict:
    ha = http_as(alice)
    gone = register(ha)
    assert ha.delete(f"/api/clients/{gone}/").status_code == 204
    return {
        "own": register(ha),
        "bob": register(http_as(bob)),
        "gone": gone,
        "unknown": str(uuid.uuid4()),
        "cookie": session_cookie(alice).encode(),
    }


@pytest.fixture
async def ids(alice, bob) -> dict:
    """
    Alice's client and session cookie, bob's client, a deleted and an unknown client id.
    """
    return await _query_world(alice, bob)


def render_query(pieces: list, ids: dict) -> bytes:
    out = []
    for piece in pieces:
        if isinstance(piece, tuple):
            who, form = piece
            cid = ids[who.decode()[1:-1]]
            out.append((form % cid.replace("-", "") if form == "%s" else form.format(cid)).encode())
        else:
            out.append(piece)
    return b"".join(out)


@database_sync_to_async
def channel_of(client_id: str) -> str:
    return Client.objects.get(pk=client_id).channel_name


async def close(communicator: WebsocketCommunicator) -> None:
    """
    Disconnect without waiting the second (in-memory) or five (channels-redis: its blocking
    receive is not interrupted) that a consumer takes to exit; its own cleanup is done by then.
    """
    await communicator.disconnect(timeout=0.1)


async def open_raw(headers: list, query: bytes) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, "/ws/", headers=headers)
    # The scope is read when the application starts: the raw bytes reach it unchanged.
    communicator.scope["query_string"] = query
    return communicator


@pytest.mark.django_db(transaction=True)
@WS_FUZZ
@given(pieces=ws_queries(), logged_in=st.booleans())
async def test_any_query_string_gets_hello_or_a_protocol_close_code(ids, pieces, logged_in):
    """Whatever the query string (garbage, repeats, unicode, percent-encoding, raw bytes), the
    socket gets hello for the caller's own client or a close with 4400/4401/4403/4404, never 1011
    or a crash; anonymous sockets always get 4401; another user's client is never attached."""
    query = render_query(pieces, ids)
    note(f"query: {query!r}")
    headers = [HOST, (b"origin", ORIGIN)] + ([(b"cookie", ids["cookie"])] if logged_in else [])
    communicator = await open_raw(headers, query)
    accepted, _ = await communicator.connect(timeout=TIMEOUT)
    assert accepted  # the consumer accepts, then refuses with a code (FIELD-NOTES)
    output = await communicator.receive_output(TIMEOUT)
    event(f"answer: {output.get('code', 'hello')}")
    if output["type"] == "websocket.close":
        assert output.get("code") in REFUSALS, output
        if not logged_in:
            assert output["code"] == 4401, output
    else:
        hello = json.loads(output["text"])
        assert logged_in and hello == {"type": "hello", "client_id": ids["own"], "head": 0}, hello
    await close(communicator)
    assert await channel_of(ids["bob"]) == ""


# fmt: off
ORIGIN_PIECES = st.sampled_from(
    ["http://", "https://", "ws://", "//", "localhost", "LOCALHOST", "127.0.0.1", "[::1]", "[",
     "]", "::1", "testserver", "evil.example", ".", ":", ":8000", ":99999", ":abc", "@", "/",
     "?", "#", "%00", "null", " ", "\t", "\\"]
)
# fmt: on
ALLOWED_ORIGIN_HOSTS = ["localhost", "LocalHost", "127.0.0.1", "[::1]", "testserver"]
ODD_ORIGIN_HOSTS = ["[::2]", "localhost.", "localhost.evil.example", "evil.example", ""]
ORIGINS = st.one_of(
    st.tuples(
        st.sampled_from(["http://", "https://", "ws://", "//", "", "null"]),
        st.sampled_from(ALLOWED_ORIGIN_HOSTS + ODD_ORIGIN_HOSTS),
        st.sampled_from(["", ":8000", ":99999", ":abc", "/", "/x?y#z", "@localhost"]),
    ).map("".join),
    st.lists(ORIGIN_PIECES | st.text(st.characters(max_codepoint=255), max_size=6), max_size=6).map(
        "".join
    ),
).map(lambda origin: origin.encode("latin-1"))


def daphne_delivers(origin: bytes) -> bool:
    """
    Whether daphne hands this Origin to the application at all: its WebSocket layer (autobahn)
    answers HTTP 400 itself to an Origin that urlsplit rejects (`http://[`), and channels'
    validator would raise on it.
    """
    try:
        urlsplit(origin.decode("latin-1"))
    except ValueError:
        return False
    return True


@pytest.mark.django_db(transaction=True)
@WS_FUZZ
@given(origin=st.none() | ORIGINS)
async def test_any_origin_header_is_accepted_only_for_an_allowed_host(ids, origin):
    """A socket gets in only when its Origin is exactly the site's scheme://host[:port] (as
    Django's CSRF check compares it); any other scheme, port or host, a missing, odd or null
    Origin is refused at the handshake."""
    assume(origin is None or daphne_delivers(origin))
    note(f"origin: {origin!r}")
    headers = [HOST, (b"cookie", ids["cookie"])] + ([] if origin is None else [(b"origin", origin)])
    communicator = await open_raw(headers, f"client_id={ids['own']}".encode())
    accepted, _ = await communicator.connect(timeout=TIMEOUT)
    allowed = origin == ORIGIN  # the Host is localhost, the scheme ws
    assert accepted == allowed
    event(f"accepted: {accepted}")
    if accepted:
        hello = await communicator.receive_json_from(TIMEOUT)
        assert hello["type"] == "hello", hello
    await close(communicator)


# -- HTTP --------------------------------------------------------------------------------------


JSON = "application/json"


def assert_protocol_answer(response) -> None:
    """
    Never a 500; every 4xx is the protocol's JSON error body with a known stable code.
    """
    status = response.status_code
    assert status < 500, (status, response.content[:500])
    if status >= 400:
        assert response["Content-Type"].startswith(JSON), (
            status,
            response["Content-Type"],
            response.content[:300],
        )
        body = json.loads(response.content)
        assert list(body) == ["error"] and set(body["error"]) == {"code", "detail"}, body
        assert body["error"]["code"] in CODES, body
        assert isinstance(body["error"]["detail"], str) and body["error"]["detail"], body


class HttpWorld:
    """
    Alice's HTTP sessions (with CSRF enforced and a valid token, and without), her client, bob's
    client, and rooms "fuzz" (alice is a member) and "private" (bob's).
    """

    TOKEN = "t" * 32

    def __init__(self, alice, bob) -> None:
        self.alice = alice
        self.plain = http_as(alice)
        self.csrf = http_as(alice, csrf=True)
        self.csrf.cookies["csrftoken"] = self.TOKEN
        hb = http_as(bob)
        self.bob_client = register(hb)
        self.own = register(self.plain)
        for http, name in ((self.plain, "fuzz"), (hb, "private"), (hb, "lobby")):
            assert api_post(http, "/api/rooms/", {"name": name}).status_code == 201

    def own_client(self) -> str:
        """
        Alice's client, registered again if a fuzzed DELETE removed it.
        """
        if not Client.objects.filter(pk=self.own).exists():
            self.own = register(self.plain)
        return self.own

    def session(self, csrf: bool):
        return self.csrf if csrf else self.plain

    def headers(self, csrf: bool) -> dict:
        return {"HTTP_X_CSRFTOKEN": self.TOKEN} if csrf else {}


@pytest.fixture
def http_world(alice, bob):
    return HttpWorld(alice, bob)


# fmt: off
CONTENT_TYPES = st.one_of(
    st.sampled_from(
        ["application/json", "application/json; charset=utf-8",
         "application/json; charset=latin-1", "application/json; charset=bogus", "text/plain",
         "", "application/octet-stream", "application/x-www-form-urlencoded",
         "application/x-www-form-urlencoded; charset=utf-16",
         "application/x-www-form-urlencoded; charset=bogus", "multipart/form-data",
         "multipart/form-data; boundary=", "multipart/form-data; boundary=xyz",
         "multipart/form-data; boundary=" + "b" * 300,
         "multipart/form-data; boundary=xyz; charset=bogus", "*/*"]
    ),
    st.text(st.characters(max_codepoint=255), max_size=40),
)
# fmt: on


@st.composite
def near_sends(draw, client_id: str) -> dict:
    """
    A send request body with each field valid, absent or of any value.
    """
    fields = {
        "client_id": st.just(client_id) | st.just(ABSENT) | ANY_VALUE,
        "client_msg_id": st.integers(0, 10**6).map("m-{}".format) | st.just(ABSENT) | ANY_VALUE,
        "to": st.sampled_from([{"user": "bob"}, {"room": "fuzz"}, {"room": "private"}])
        | st.just(ABSENT)
        | ANY_VALUE,
        "body": ANY_VALUE | st.just(ABSENT),
    }
    body = draw(extras(*fields))
    for name, strategy in fields.items():
        value = draw(strategy)
        if value is not ABSENT:
            body[name] = value
    return body


def multipart(token: str, fields: dict) -> bytes:
    parts = [("csrfmiddlewaretoken", token), *fields.items()]
    chunks = [
        f'--xyz\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in parts
    ]
    return b"".join(chunks) + b"--xyz--\r\n"


FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data; boundary=xyz"


def request_body(draw, cid: str) -> tuple[bytes, str]:
    """
    A request body of some kind, with the Content-Type it would naturally carry (half the time)
    or any other.
    """
    kind = draw(
        st.sampled_from(
            ["json", "send", "binary", "deep", "soup", "huge", "bom", "badutf8", "form", "multi"]
        )
    )
    natural = JSON
    if kind == "json":
        value = draw(ANY_VALUE | st.dictionaries(st.sampled_from(["seq", "name"]), ANY_VALUE))
        body = json.dumps(value, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    elif kind == "send":
        body = json.dumps(draw(near_sends(cid))).encode()
    elif kind == "binary":
        body = draw(st.binary(max_size=300))
    elif kind == "deep":
        body = draw(DEEP_TEXT).encode()
    elif kind == "soup":
        body = draw(SOUP | SCANNER_TRAPS).encode()
    elif kind == "huge":
        body = b" " * draw(st.integers(400_000, 600_000)) + b"{}"
    elif kind == "bom":
        body = b"\xef\xbb\xbf" + json.dumps({"seq": 0, "name": "bom"}).encode()
    elif kind == "badutf8":
        body = b'{"seq": 0, "name": "\xff\xfe", "body": "\xed\xa0\x80"}'
    elif kind == "form":
        body, natural = f"csrfmiddlewaretoken={HttpWorld.TOKEN}&name=formroom&seq=0".encode(), FORM
    else:
        body, natural = multipart(HttpWorld.TOKEN, {"name": "multiroom", "seq": "0"}), MULTIPART
    return body, draw(st.just(natural) | CONTENT_TYPES)


BODY_ENDPOINTS = [
    "/api/clients/",
    "/api/clients/{cid}/close",
    "/api/clients/{cid}/ack",
    "/api/messages/",
    "/api/rooms/",
    "/api/rooms/lobby/join",
    "/api/rooms/lobby/leave",
]


@pytest.mark.django_db
@HTTP_FUZZ
@given(data=st.data(), csrf=st.booleans())
def test_any_request_body_on_every_endpoint_gets_a_protocol_answer(http_world, data, csrf):
    """Any JSON value, near-valid sends, non-JSON bytes, invalid UTF-8, deep nesting, huge bodies
    and form/multipart bodies under any Content-Type, with CSRF enforced or not: never a 500, every
    4xx a JSON error with a stable code, and a send that is refused stores nothing."""
    cid = http_world.own_client()
    path = data.draw(st.sampled_from(BODY_ENDPOINTS)).format(cid=cid)
    body, content_type = request_body(data.draw, cid)
    note(f"POST {path} [{content_type!r}] {body[:300]!r}")
    before = Message.objects.count()
    response = http_world.session(csrf).generic(
        "POST", path, body, content_type=content_type, **http_world.headers(csrf)
    )
    assert_protocol_answer(response)
    stored = Message.objects.count() - before
    assert stored == (1 if path == "/api/messages/" and response.status_code == 201 else 0)


QUERY_KEYS = st.sampled_from(["after", "limit", "before", "AFTER", "after[]", "x", ""]) | TEXT
# fmt: off
QUERY_VALUES = (
    st.sampled_from(
        ["", "0", "1", "7", "-1", "+1", " 1", "1 ", "1.5", "1e3", "0x10", "00", "0" * 20 + "1",
         "\u0663", "\uff11", "²", str(MAX_INT), str(MAX_INT + 1), "9" * 19, "9" * 40, "null",
         "%00", "%ff", "%2B1", "%201"]
    )
    | TEXT
)
# fmt: on


def spec_int(raw: str | None, *, minimum: int) -> bool:
    """
    The protocol's query integer: absent, or 1 to 19 ASCII digits with a value in range.
    """
    if raw is None:
        return True
    return bool(re.fullmatch(r"[0-9]{1,19}", raw)) and minimum <= int(raw) <= MAX_INT


def encode_part(text: str, how: str) -> str:
    text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if how == "quote":
        return quote(text, safe="")
    # Raw, except what would end the query in a URL (a fragment) or cannot be in one.
    return text.replace("#", "%23").replace("\x00", "%00")


@st.composite
def queries(draw) -> str:
    pairs = draw(st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES, st.booleans()), max_size=6))
    how = draw(st.sampled_from(["raw", "quote"]))
    parts = []
    for key, value, with_equals in pairs:
        key, value = encode_part(key, how), encode_part(value, how)
        parts.append(f"{key}={value}" if with_equals else key)
    if draw(st.integers(0, 9)) == 0:
        parts += ["a=1"] * 1001  # past DATA_UPLOAD_MAX_NUMBER_FIELDS
    return draw(st.sampled_from(["&", "&&", ";"])).join(parts)


@pytest.mark.django_db
@HTTP_FUZZ
@given(query=queries(), endpoint=st.sampled_from(["client", "room", "rooms"]))
def test_any_query_string_gets_the_page_or_the_precise_400(http_world, query, endpoint):
    """after/limit/before with garbage, repeats (the last counts), unicode, percent-encoding or
    too many fields: 200 with the page when each is a valid integer, else 400 with the field's
    code (or malformed), never a 500."""
    path = {
        "client": f"/api/clients/{http_world.own_client()}/messages",
        "room": "/api/rooms/fuzz/messages",
        "rooms": "/api/rooms/",
    }[endpoint]
    note(f"GET {path}?{query}")
    response = http_world.plain.get(f"{path}?{query}")
    assert_protocol_answer(response)
    if endpoint == "rooms":  # takes no parameters and reads none
        assert response.status_code == 200, response.content[:300]
        return
    try:
        params = QueryDict(urlparse(f"{path}?{query}").query.encode())
    except TooManyFieldsSent:
        assert response.status_code == 400 and response.json()["error"]["code"] == "malformed"
        return
    expected = None
    if endpoint == "client" and not spec_int(params.get("after"), minimum=0):
        expected = "invalid_after"
    elif endpoint == "room" and not spec_int(params.get("before"), minimum=0):
        expected = "invalid_before"
    elif not spec_int(params.get("limit"), minimum=1):
        expected = "invalid_limit"
    if expected is None:
        assert response.status_code == 200, response.content[:300]
        assert {"client": "deliveries", "room": "messages"}[endpoint] in response.json()
    else:
        assert response.status_code == 400 and response.json()["error"]["code"] == expected


PATH_SEGMENTS = st.one_of(
    st.sampled_from(
        ["{own}", "{bob}", "{unknown}", "", ".", "..", "%00", "%ff", "%2F", "%ED%A0%80", "a/b"]
    ),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=40).map(
        lambda s: s.replace("#", "%23").replace("?", "%3F")
    ),
    TEXT.map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")),
)
PATH_TEMPLATES = [
    "/api/clients/{}/",
    "/api/clients/{}/close",
    "/api/clients/{}/messages",
    "/api/clients/{}/ack",
    "/api/rooms/{}/join",
    "/api/rooms/{}/leave",
    "/api/rooms/{}/messages",
    "/api/{}",
    "/api/messages/{}",
]
METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"]


@pytest.mark.django_db
@HTTP_FUZZ
@given(
    template=st.sampled_from(PATH_TEMPLATES),
    segment=PATH_SEGMENTS,
    method=st.sampled_from(METHODS),
    csrf=st.booleans(),
)
def test_any_path_gets_a_protocol_answer_and_never_touches_others_data(
    http_world, template, segment, method, csrf
):
    """Client ids and room names in URLs of any text, percent-encoding or invalid UTF-8, with any
    method: never a 500, every 4xx a JSON error, and bob's client is never reachable."""
    for name, value in [
        ("{own}", http_world.own_client()),
        ("{bob}", http_world.bob_client),
        ("{unknown}", str(uuid.uuid4())),
    ]:
        segment = segment.replace(name, value)
    path = template.format(segment)
    note(f"{method} {path}")
    body = json.dumps({"seq": 0, "name": "pathroom"})
    response = http_world.session(csrf).generic(
        method, path, body, content_type="application/json", **http_world.headers(csrf)
    )
    assert_protocol_answer(response)
    if http_world.bob_client in path and "/clients/" in path:
        assert response.status_code in (403, 404, 405), response.content
    assert Client.objects.filter(pk=http_world.bob_client).exists()


@st.composite
def header_cases(draw) -> dict:
    extra: dict = {}
    for name, strategy in [
        ("HTTP_ORIGIN", ORIGINS.map(lambda b: b.decode("latin-1"))),
        ("HTTP_REFERER", ORIGINS.map(lambda b: b.decode("latin-1"))),
        ("HTTP_HOST", st.sampled_from(["localhost", "127.0.0.1:8000", "[::1]", "evil.example"])),
        ("HTTP_X_CSRFTOKEN", st.text(st.characters(max_codepoint=255), max_size=70)),
        ("HTTP_COOKIE", st.text(st.characters(max_codepoint=255), max_size=60)),
        ("HTTP_ACCEPT", st.text(st.characters(max_codepoint=255), max_size=20)),
    ]:
        if draw(st.integers(0, 3)) == 0:
            extra[name] = draw(strategy)
    return extra


# fmt: off
CONTENT_LENGTHS = st.sampled_from(
    ["", "abc", "-1", "-99999", " 5", "+5", "5_0", "\u0665", "0", "0x10", "1e3", str(10**12),
     str(2**64)]
) | st.integers(-10, 10**13).map(str)
# fmt: on


def client_can_simulate(length: str, body: bytes, content_type: str) -> bool:
    """
    Whether Django's test client can simulate this Content-Length: it fails the test (not the
    server) when asked to read more bytes than the body has, which only a broken client sends.
    """
    try:
        declared = int(length)
    except ValueError:
        return True
    if declared <= len(body):
        return True
    return declared > 3 * 1024 * 1024 and not content_type.startswith("multipart/")


@pytest.mark.django_db
@HTTP_FUZZ
@given(
    data=st.data(),
    method=st.sampled_from(METHODS),
    headers=header_cases(),
    csrf=st.booleans(),
    secure=st.booleans(),
)
def test_any_headers_get_a_protocol_answer(http_world, data, method, headers, csrf, secure):
    """Content-Type, Content-Length, Origin, Referer, Host, CSRF token, Cookie and scheme
    oddities on every endpoint: never a 500, and every 4xx is a JSON error with a stable code."""
    cid = http_world.own_client()
    path = data.draw(st.sampled_from([*BODY_ENDPOINTS, "/api/clients/{cid}/messages"]))
    path = path.format(cid=cid)
    body, content_type = request_body(data.draw, cid)
    extra = http_world.headers(csrf) | headers
    if data.draw(st.booleans()):
        length = data.draw(CONTENT_LENGTHS)
        assume(client_can_simulate(length, body, content_type))
        extra["CONTENT_LENGTH"] = length
    note(f"{method} {path} secure={secure} [{content_type!r}] {extra!r} {body[:200]!r}")
    response = http_world.session(csrf).generic(
        method, path, body, content_type=content_type, secure=secure, **extra
    )
    assert_protocol_answer(response)


# -- regressions: what the fuzzers above found -------------------------------------------------

# 60 KB of escaped quotes, then brackets: the depth pre-check once took ~16 s on it (quadratic),
# blocking the event loop of every socket of the process; a 1 MiB frame took hours.
SCANNER_TRAP = '\\"' * 30_000 + "[" * (MAX_DEPTH + 100)


def test_scanner_hostile_text_is_parsed_in_linear_time():
    """An unterminated string full of escaped quotes before deep brackets is refused at once."""
    for text in (SCANNER_TRAP, '"' + SCANNER_TRAP, SEND_PREFIX + SCANNER_TRAP):
        started = time.monotonic()
        with pytest.raises(Malformed) as refused:
            parse_json(text.encode())
        assert time.monotonic() - started < PROMPT / 4
        assert refused.value.code == "malformed_json"


@pytest.mark.django_db(transaction=True)
async def test_scanner_hostile_frame_and_body_are_answered_promptly(alice):
    """The same text as a WebSocket frame or an HTTP body is malformed_json within a moment."""
    http = await database_sync_to_async(http_as)(alice)
    cid = await database_sync_to_async(register)(http)
    tab = await connect_tab(alice, cid)
    started = time.monotonic()
    await tab.send_text(SCANNER_TRAP)
    answer = await tab.recv()
    assert answer["type"] == "error" and answer["code"] == "malformed_json", answer
    assert time.monotonic() - started < PROMPT
    await tab.disconnect()
    started = time.monotonic()
    response = await database_sync_to_async(http.generic)(
        "POST", "/api/messages/", SCANNER_TRAP, content_type=JSON
    )
    assert time.monotonic() - started < PROMPT
    assert_protocol_answer(response)
    assert response.json()["error"]["code"] == "malformed_json"


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/clients/{cid}/ack", "/api/messages/", "/api/rooms/"])
def test_multipart_form_to_a_json_endpoint_with_csrf_is_400_not_500(http_world, path):
    """A multipart form carrying a valid CSRF token, sent where JSON is expected, is a JSON 400
    (the CSRF check had consumed the body: Django raised RawPostDataException, a 500)."""
    body = multipart(HttpWorld.TOKEN, {"name": "formroom", "seq": "0"})
    response = http_world.csrf.generic(
        "POST", path.format(cid=http_world.own), body, content_type=MULTIPART
    )
    assert_protocol_answer(response)
    assert response.status_code == 400 and response.json()["error"]["code"] == "malformed"
    assert Message.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    "content_type",
    [
        f"{FORM}; charset=utf-16",  # Django's own 400 view parsed the form again: a 500
        "multipart/form-data",  # no boundary: Django's HTML 400 page
        "multipart/form-data; boundary=" + "b" * 300,
    ],
)
def test_form_body_django_cannot_parse_is_a_json_400(http_world, content_type):
    """A form body the CSRF check cannot parse is the protocol's JSON 400, never HTML or a 500."""
    response = http_world.csrf.generic(
        "POST", "/api/rooms/", b"name=x", content_type=content_type, **http_world.headers(True)
    )
    assert_protocol_answer(response)
    assert response.status_code == 400


@pytest.mark.django_db
def test_requests_django_refuses_before_the_api_are_json_400(http_world):
    """A Host not in ALLOWED_HOSTS and more query fields than Django parses are JSON 400s."""
    for response in (
        http_world.plain.get("/api/rooms/", HTTP_HOST="evil.example"),
        http_world.plain.get("/api/rooms/fuzz/messages?" + "&".join(["a=1"] * 1001)),
    ):
        assert_protocol_answer(response)
        assert response.status_code == 400 and response.json()["error"]["code"] == "malformed"
