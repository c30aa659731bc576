"""Delivery frames written straight to daphne's socket (messaging.frames): byte for byte a
WebSocket text frame, in order with what Twisted holds, and only while that is safe."""

import collections
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
    dep = Deployment(tmp_path)
    try:
        dep.create_user("fran", "fran-pass-1")
        server = dep.start()
        session = Session(server.base_url)
        session.login("fran", "fran-pass-1")
        _, created = session.request("POST", "/api/clients/")
        cid = created["client_id"]
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
    finally:
        dep.close()


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
