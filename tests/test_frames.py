"""Delivery frames written straight to daphne's socket (messaging.frames): byte for byte a
WebSocket text frame, in order with what Twisted holds, and only while that is safe."""

import collections
import contextlib
import functools
import json
import socket
import struct

import pytest
import websockets
from daphne.server import Server
from twisted.internet.interfaces import ISSLTransport
from zope.interface import alsoProvides

from messaging import frames
from tests.servers import Deployment, Session


class FakeTransport:
    """What the writer uses of Twisted's TCP transport."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.dataBuffer = b""
        self._tempDataBuffer: list[bytes] = []
        self.connected = True
        self.disconnecting = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class FakeProtocol:
    """What the writer uses of autobahn's WebSocketServerProtocol."""

    STATE_OPEN = 3

    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport
        self.state = self.STATE_OPEN
        self.send_queue: collections.deque = collections.deque()
        self._perMessageCompress = None
        self.maxMessagePayloadSize = 0
        self.autoFragmentSize = 0


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def daphne_send(protocol) -> functools.partial:
    # How daphne hands a connection's send to the application.
    return functools.partial(Server.__new__(Server).handle_reply, protocol)


def read_frame(data: bytes) -> tuple[int, str, bytes]:
    # (first byte, text, the rest): a minimal RFC 6455 reader of one unmasked frame.
    first, second = data[0], data[1]
    assert second & 0x80 == 0, "a server frame is never masked"
    size, offset = second & 0x7F, 2
    if size == 126:
        (size,) = struct.unpack("!H", data[2:4])
        offset = 4
    elif size == 127:
        (size,) = struct.unpack("!Q", data[2:10])
        offset = 10
    return first, data[offset : offset + size].decode("utf-8"), data[offset + size :]


def receive_all(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        out += sock.recv(n - len(out))
    return out


@contextlib.contextmanager
def served_client(tmp_path, name: str):
    # A real daphne with user `name` logged in and one client registered: (server, session, id).
    dep = Deployment(tmp_path)
    try:
        dep.create_user(name, f"{name}-pass-1")
        server = dep.start()
        session = Session(server.base_url)
        session.login(name, f"{name}-pass-1")
        _, created = session.request("POST", "/api/clients/")
        yield server, session, created["client_id"]
    finally:
        dep.close()


@pytest.mark.parametrize("length", [0, 5, 125, 126, 65535, 65536, 70000])
def test_a_frame_is_a_final_unmasked_text_frame_of_its_payload(pair, length):
    """Headers of every size class (7-bit, 16-bit and 64-bit lengths) carry the exact payload."""
    a, b = pair
    writer = frames.writer_for(daphne_send(FakeProtocol(FakeTransport(a))))
    text = "é" * (length // 2) + "x" * (length % 2)
    assert writer(text) is True
    header = frames.frame_header(len(text.encode()))
    data = receive_all(b, len(header) + len(text.encode()))
    first, got, rest = read_frame(data)
    assert (first, got, rest) == (0x81, text, b"")


def test_a_frame_goes_behind_what_twisted_holds_and_a_partial_send_keeps_the_rest(pair):
    """With bytes waiting in Twisted's buffer the frame is appended there (order kept); when the
    socket takes only part of a frame, the rest goes to Twisted's buffer."""
    a, b = pair
    transport = FakeTransport(a)
    writer = frames.writer_for(daphne_send(FakeProtocol(transport)))
    transport._tempDataBuffer = [b"earlier"]
    assert writer("behind") is True
    assert transport.written == [frames.frame_header(6) + b"behind"]

    transport._tempDataBuffer, transport.written = [], []
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = "y" * 2_000_000
    assert writer(big) is True
    direct = receive_all(b, 1)
    b.setblocking(False)
    try:
        while True:
            direct += b.recv(1 << 20)
    except BlockingIOError:
        pass
    assert transport.written and len(direct) < 2_000_000
    _, text, rest = read_frame(direct + transport.written[0])
    assert text == big and rest == b""


def test_anything_unusual_goes_the_asgi_way(pair, settings):
    """Not open, compression, autobahn's own queue, a payload limit or fragmenting: the writer
    declines (the consumer then sends through daphne); other servers and TLS connections get
    no writer at all."""
    a, _ = pair
    protocol = FakeProtocol(FakeTransport(a))
    writer = frames.writer_for(daphne_send(protocol))
    for name, value in [
        ("state", 4),
        ("_perMessageCompress", object()),
        ("send_queue", collections.deque([(b"x", False)])),
        ("maxMessagePayloadSize", 3),
        ("autoFragmentSize", 3),
    ]:
        saved = getattr(protocol, name)
        setattr(protocol, name, value)
        assert writer("four") is False, name
        setattr(protocol, name, saved)
    protocol.transport.disconnecting = True
    assert writer("four") is False
    assert protocol.transport.written == []

    async def other_send(message):
        pass

    assert frames.writer_for(other_send) is None
    assert frames.writer_for(functools.partial(print, protocol)) is None
    tls = FakeTransport(a)
    alsoProvides(tls, ISSLTransport)  # what daphne's ssl: endpoint's wrapper provides
    assert frames.writer_for(daphne_send(FakeProtocol(tls))) is None
    settings.MESSAGING_DIRECT_FRAMES = False
    assert frames.writer_for(daphne_send(FakeProtocol(FakeTransport(a)))) is None


async def test_real_daphne_sockets_get_their_deliveries_written_directly(tmp_path):
    """Through a real daphne the consumer finds the connection's protocol (the server says so in
    its log), and deliveries of every size arrive intact and in order."""
    with served_client(tmp_path, "fran") as (server, session, cid):
        url = f"{server.ws_url}/ws/?client_id={cid}"
        bodies = ["ß", "z" * 200, "€" * 21_000, "q" * 65_000]
        async with websockets.connect(url, additional_headers=session.ws_headers()) as ws:
            assert json.loads(await ws.recv())["type"] == "hello"
            for i, body in enumerate(bodies):
                frame = {"type": "send", "client_msg_id": str(i), "to": {"user": "fran"}}
                await ws.send(json.dumps({**frame, "body": body}))
            got = []
            while len(got) < len(bodies):
                frame = json.loads(await ws.recv())
                if frame["type"] == "delivery":
                    got.append((frame["seq"], frame["message"]["body"]))
        assert got == list(enumerate(bodies, 1))
        assert "delivery frames are written to the sockets directly" in server.log.read_text()


def test_hand_overs_give_the_loop_a_turn_by_time_or_every_16_frames_sent_the_asgi_way(
    settings, monkeypatch
):
    """With direct frames a run of hand-overs lasts TURN_SECONDS (the frames are out already);
    without them the loop gets a turn every TAKES_PER_TURN, when the frames leave."""
    from clients import push

    monkeypatch.setattr(push, "TURN_SECONDS", 60.0)
    settings.MESSAGING_DIRECT_FRAMES = True
    turn = push._Turn()
    assert not any(turn.over() for _ in range(1000))
    monkeypatch.setattr(push, "TURN_SECONDS", 0.0)
    assert push._Turn().over()
    monkeypatch.setattr(push, "TURN_SECONDS", 60.0)
    settings.MESSAGING_DIRECT_FRAMES = False
    turn = push._Turn()
    assert [i for i in range(1, 49) if turn.over()] == [16, 32, 48]


# -- frames from the tab (frames.install_reader) ---------------------------------------------


class FakeStats:
    def __init__(self) -> None:
        self.incomingOctetsWireLevel = 0
        self.incomingOctetsWebSocketLevel = 0
        self.incomingOctetsAppLevel = 0
        self.incomingWebSocketFrames = 0
        self.incomingWebSocketMessages = 0


class FakeReadingProtocol(FakeProtocol):
    """What the reader uses of autobahn's protocol: autobahn's own parser records what it got."""

    def __init__(self, transport: FakeTransport) -> None:
        super().__init__(transport)
        self.data = b""
        self.current_frame = None
        self.inside_message = False
        self.failedByMe = False
        self.logOctets = self.logFrames = False
        self.trackedTimings = None
        self.requireMaskedClientFrames = True
        self.applyMask = True
        self.maxFramePayloadSize = 0
        self.trafficStats = FakeStats()
        self.autoPingTimeoutCall = None
        self.autoPingRestartOnAnyTraffic = True
        self._listeners = None
        self._parent = None
        self.to_autobahn: list[bytes] = []
        self.messages: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.to_autobahn.append(data)

    def onMessage(self, payload: bytes, is_binary: bool) -> None:
        assert is_binary is False
        self.messages.append(payload)

    def _cancelAutoPingTimeoutCall(self) -> None:
        self.autoPingTimeoutCall = None


def client_frame(payload: bytes, first: int = 0x81, mask: bytes = b"\x0f\xa5\x3c\x96") -> bytes:
    # A client frame as RFC 6455 has it: masked, with the shortest length encoding.
    n = len(payload)
    if n < 126:
        header = bytes((first, 0x80 | n))
    elif n <= 0xFFFF:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 125, 126, 4099, 65535])
def test_unmask_is_rfc_6455_masking(length):
    payload = bytes((i * 7 + 3) % 256 for i in range(length))
    mask = b"\x01\x80\xff\x42"
    assert frames.unmask(payload, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_plain_frames_go_to_daphne_without_autobahn(pair):
    """Complete final masked text frames of 7- and 16-bit lengths, several in one chunk, reach
    onMessage in order as the unmasked payload; autobahn sees none of them."""
    protocol = FakeReadingProtocol(FakeTransport(pair[0]))
    assert frames.install_reader(daphne_send(protocol)) is True
    payloads = [b'{"type":"ack","seq":1}', b"", "é".encode() * 100, b"x" * 65535]
    protocol.dataReceived(b"".join(client_frame(p) for p in payloads))
    protocol.dataReceived(client_frame(b"next"))
    assert protocol.messages == [*payloads, b"next"]
    assert protocol.to_autobahn == []
    stats = protocol.trafficStats
    assert stats.incomingWebSocketMessages == stats.incomingWebSocketFrames == 5
    assert stats.incomingOctetsAppLevel == sum(map(len, payloads)) + 4


@pytest.mark.parametrize(
    "odd",
    [
        client_frame(b"ping", first=0x89),  # a control frame
        client_frame(b"frag", first=0x01),  # the first fragment of a message
        client_frame(b"\xff\xfe"),  # invalid UTF-8: autobahn closes with 1007
        client_frame(b"bin", first=0x82),  # binary
        client_frame(b"rsv", first=0xC1),  # an extension bit
        bytes((0x81, 3)) + b"abc",  # unmasked: autobahn fails the connection
        client_frame(b"y" * 70_000),  # a 64-bit length
        client_frame(b"cut")[:-1],  # a partial frame
        struct.pack("!BBH", 0x81, 0x80 | 126, 5) + b"\0\0\0\0" + b"short",  # non-minimal length
    ],
)
def test_the_first_unusual_frame_and_the_rest_go_to_autobahn(pair, odd):
    """Frames before the unusual one are taken; from it on, autobahn parses the bytes as they
    came (and finds itself between frames)."""
    protocol = FakeReadingProtocol(FakeTransport(pair[0]))
    frames.install_reader(daphne_send(protocol))
    rest = odd + client_frame(b"after")
    protocol.dataReceived(client_frame(b"before") + rest)
    assert protocol.messages == [b"before"]
    assert protocol.to_autobahn == [rest]


def test_autobahn_keeps_the_bytes_while_it_is_inside_a_frame_or_message(pair, settings):
    """Whatever autobahn holds (buffered bytes, a frame or fragmented message begun, a failure,
    another state, compression, a limit, logging, a listener) sends every chunk to it whole;
    MESSAGING_DIRECT_FRAMES off or another server installs nothing."""
    protocol = FakeReadingProtocol(FakeTransport(pair[0]))
    frames.install_reader(daphne_send(protocol))
    chunk = client_frame(b"12345678")
    for name, value in [
        ("data", b"\x81"),
        ("current_frame", object()),
        ("inside_message", True),
        ("failedByMe", True),
        ("state", 4),
        ("_perMessageCompress", object()),
        ("logFrames", True),
        ("_listeners", {"message": [print]}),
        ("maxFramePayloadSize", 4),
        ("maxMessagePayloadSize", 4),
    ]:
        saved = getattr(protocol, name)
        setattr(protocol, name, value)
        protocol.to_autobahn = []
        protocol.dataReceived(chunk)
        assert protocol.to_autobahn == [chunk], name
        setattr(protocol, name, saved)
    assert protocol.messages == []

    async def other_send(message):
        pass

    assert frames.install_reader(other_send) is False
    settings.MESSAGING_DIRECT_FRAMES = False
    assert frames.install_reader(daphne_send(FakeReadingProtocol(FakeTransport(pair[0])))) is False


def test_a_message_that_closes_the_socket_stops_the_parsing(pair):
    """After a message that moves the socket out of the open state, the rest is autobahn's."""
    protocol = FakeReadingProtocol(FakeTransport(pair[0]))
    frames.install_reader(daphne_send(protocol))

    def closing(payload, is_binary):
        protocol.messages.append(payload)
        protocol.state = 4

    protocol.onMessage = closing
    frames.install_reader(daphne_send(protocol))
    rest = client_frame(b"two")
    protocol.dataReceived(client_frame(b"one") + rest)
    assert protocol.messages == [b"one"] and protocol.to_autobahn == [rest]


def server_frames(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    # (opcode, payload) of the next `count` unmasked server frames.
    out, data = [], b""
    while len(out) < count:
        while True:
            if len(data) >= 2:
                size, offset = data[1] & 0x7F, 2
                if size == 126 and len(data) >= 4:
                    (size,) = struct.unpack("!H", data[2:4])
                    offset = 4
                if size < 127 and len(data) >= offset + size:
                    break
            chunk = sock.recv(65536)
            assert chunk, "the server closed the socket"
            data += chunk
        out.append((data[0] & 0x0F, data[offset : offset + size]))
        data = data[offset + size :]
    return out


def test_real_daphne_reads_plain_and_unusual_frames_alike(tmp_path):
    """Against a real daphne, one write carrying plain frames, a WebSocket ping, a fragmented
    message and a 16-bit frame gets every answer; invalid UTF-8 ends the connection."""
    import base64
    import os

    with served_client(tmp_path, "gil") as (server, session, cid):
        host, port = server.base_url.split("//")[1].split(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        headers = session.ws_headers()
        sock.sendall(
            (
                f"GET /ws/?client_id={cid} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nOrigin: {headers['Origin']}\r\n"
                f"Cookie: {headers['Cookie']}\r\n\r\n"
            ).encode()
        )
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 101")
        rest = reply.split(b"\r\n\r\n", 1)[1]
        assert rest == b"" or rest[0] == 0x81
        hello = server_frames(sock, 1) if rest == b"" else [(1, rest[2:])]
        assert json.loads(hello[0][1])["type"] == "hello"

        ping = json.dumps({"type": "ping"}).encode()
        long_ping = json.dumps({"type": "ping", "pad": "p" * 300}).encode()
        sock.sendall(
            client_frame(ping)
            + client_frame(ping)
            + client_frame(b"are you there", first=0x89)  # WebSocket ping
            + client_frame(ping[:5], first=0x01)  # a message in two fragments
            + client_frame(ping[5:], first=0x80)
            + client_frame(long_ping)
            + client_frame(ping)
        )
        got = server_frames(sock, 6)
        assert (0xA, b"are you there") in got  # autobahn answered the ping
        pongs = [json.loads(p)["type"] for op, p in got if op == 1]
        assert pongs == ["pong"] * 5

        # Invalid UTF-8: autobahn fails the connection (it drops it: failByDrop), no answer.
        sock.sendall(client_frame(b'{"type": "ping", "x": "\xff"}'))
        try:
            left = server_frames(sock, 1)
        except (ConnectionResetError, AssertionError):
            left = []
        assert all(opcode == 8 for opcode, _ in left)  # at most a close frame
        sock.close()
