"""
Delivery frames written straight to the socket under daphne.

A frame sent the ASGI way goes through channels' send, daphne's reply handler, autobahn's
message and frame builders (which format a debug log line per frame even when debug logging is
off) and Twisted's write, which registers the socket with the event loop for one write and
unregisters it after: about 60 % of the server's time per delivery at 200 tabs (py-spy, 2026-12-01).
Under daphne the consumer's ASGI `send` is daphne's reply handler bound to the connection's
autobahn protocol; `writer_for` finds that protocol and returns a function that writes a text
frame itself: the RFC 6455 header (a server frame is never masked) and the payload, sent at once
with one system call when nothing is waiting in Twisted's buffer, else appended to it in order.

Only while plain conditions hold (the socket is open, no compression was negotiated, autobahn
has nothing queued and no payload limit is hit); otherwise the write returns False and the
consumer sends the ASGI way. Any other server (channels' test communicator, another ASGI
server) gets no writer. MESSAGING_DIRECT_FRAMES = False turns it off.

The frames from the tab come the other way: autobahn's frame parser (pure Python, a masker
object per frame, an event fired per message) took 50 us of the event loop per ack frame, and a
fan-out to 1,000 tabs is followed by 1,000 acks, which the next send waited behind (py-spy,
2026-12-02). `install_reader` puts a parser in front of it for the plain case: complete, final,
masked text frames in a chunk of bytes with nothing of autobahn's pending; each goes to daphne's
onMessage as autobahn would pass it. The first frame that is anything else (a control frame, a
fragment, a partial frame, invalid UTF-8, over a limit), and everything after it, goes to
autobahn as before, which finds itself between frames.
"""

import functools
import logging
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import ISSLTransport

from messaging import conf

logger = logging.getLogger(__name__)

Writer = Callable[[str], bool]
_announced = False  # the log line saying that this process writes frames directly


def frame_header(length: int) -> bytes:
    """
    The header of an unmasked, final text frame with a payload of `length` bytes.
    """
    if length <= 125:
        return bytes((0x81, length))
    if length <= 0xFFFF:
        return struct.pack("!BBH", 0x81, 126, length)
    return struct.pack("!BBQ", 0x81, 127, length)


def writer_for(send: Any) -> Writer | None:
    """
    A direct writer of text frames for the connection behind this ASGI `send`, or None.
    """
    if not conf.get("MESSAGING_DIRECT_FRAMES"):
        return None
    protocol = _daphne_protocol(send)
    if protocol is None:
        return None
    open_state = protocol.STATE_OPEN
    transport = protocol.transport
    global _announced
    if not _announced:
        _announced = True
        logger.info("delivery frames are written to the sockets directly (MESSAGING_DIRECT_FRAMES)")

    def write(text: str) -> bool:
        if (
            protocol.state != open_state
            or protocol._perMessageCompress is not None
            or protocol.send_queue
            or not transport.connected
            or transport.disconnecting
        ):
            return False
        payload = text.encode("utf-8")
        size = len(payload)
        if 0 < protocol.maxMessagePayloadSize < size or 0 < protocol.autoFragmentSize < size:
            return False
        data = frame_header(size) + payload
        if transport.dataBuffer or transport._tempDataBuffer:
            transport.write(data)  # behind what Twisted holds, in order
            return True
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # The peer went away: Twisted's write finds out and closes the connection.
            sent = 0
        if sent < len(data):
            transport.write(data[sent:])
        return True

    return write


def install_reader(send: Any) -> bool:
    """
    Parse the plain frames of the connection behind this ASGI `send` before autobahn does;
    False if it is not a daphne connection (or MESSAGING_DIRECT_FRAMES is off).
    """
    if not conf.get("MESSAGING_DIRECT_FRAMES"):
        return False
    protocol = _daphne_protocol(send)
    needed = (
        "dataReceived",
        "onMessage",
        "data",
        "current_frame",
        "inside_message",
        "failedByMe",
        "logOctets",
        "logFrames",
        "trackedTimings",
        "requireMaskedClientFrames",
        "applyMask",
        "maxFramePayloadSize",
        "trafficStats",
        "autoPingTimeoutCall",
        "autoPingRestartOnAnyTraffic",
        "_cancelAutoPingTimeoutCall",
        "_listeners",
        "_parent",
    )
    if protocol is None or not all(hasattr(protocol, name) for name in needed):
        return False
    autobahn = protocol.dataReceived
    open_state = protocol.STATE_OPEN
    on_message = protocol.onMessage

    def data_received(data: bytes) -> None:
        if (
            protocol.state != open_state
            or protocol.data
            or protocol.current_frame is not None
            or protocol.inside_message
            or protocol.failedByMe
            or protocol._perMessageCompress is not None
            or protocol.logOctets
            or protocol.logFrames
            or protocol.trackedTimings
            or not protocol.requireMaskedClientFrames
            or not protocol.applyMask
            or protocol._parent is not None
            or (protocol._listeners and protocol._listeners.get("message"))
        ):
            autobahn(data)
            return
        size = len(data)
        limit = min(
            (n for n in (protocol.maxFramePayloadSize, protocol.maxMessagePayloadSize) if n > 0),
            default=0xFFFF,
        )
        pos = 0
        while pos + 6 <= size and data[pos] == 0x81:  # final text frame, no extension bits
            second = data[pos + 1]
            if second < 0x80:
                break  # unmasked: autobahn fails the connection
            length = second & 0x7F
            start = pos + 6
            if length == 126:
                if pos + 8 > size:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:
                    break  # not the shortest encoding: a protocol violation
                start = pos + 8
            elif length == 127:
                break
            end = start + length
            if end > size or length > limit:
                break
            payload = unmask(data[start:end], data[start - 4 : start])
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                break  # autobahn fails the connection (1007)
            stats = protocol.trafficStats
            stats.incomingOctetsWireLevel += end - pos
            stats.incomingOctetsWebSocketLevel += length
            stats.incomingOctetsAppLevel += length
            stats.incomingWebSocketFrames += 1
            stats.incomingWebSocketMessages += 1
            pos = end
            if protocol.autoPingTimeoutCall and protocol.autoPingRestartOnAnyTraffic:
                protocol._cancelAutoPingTimeoutCall()
            on_message(payload, False)
            if protocol.state != open_state:
                break
        if pos < size:
            autobahn(data[pos:] if pos else data)

    protocol.dataReceived = data_received
    return True


def unmask(payload: bytes, mask: bytes) -> bytes:
    """
    A client frame's payload XORed with its 4-byte mask (RFC 6455 5.3).
    """
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def close_with(send: Any, code: int) -> bool:
    """
    Close the daphne connection behind this ASGI `send` with `code` through autobahn's close
    handshake; False if `send` is not daphne's (the caller closes the ASGI way).

    For the RFC 6455 codes a server may send but autobahn refuses from an application (only 1000
    and 3000-4999 pass its sendClose): daphne turns the refusal into an error of the consumer and
    the tab sees 1011 instead, e.g. 1012 (service restart) for an operator's disconnect.
    """
    protocol = _handled_by(send)
    close_frame = getattr(protocol, "sendCloseFrame", None)
    if close_frame is None:
        return False
    if protocol.state == protocol.STATE_OPEN:
        close_frame(code=code, isReply=False)
    return True


def _handled_by(send: Any) -> Any:
    # daphne passes `functools.partial(server.handle_reply, protocol)` as a connection's send.
    if not isinstance(send, functools.partial) or len(send.args) != 1:
        return None
    if getattr(send.func, "__qualname__", "") != "Server.handle_reply":
        return None
    return send.args[0]


def _daphne_protocol(send: Any) -> Any:
    # daphne passes `functools.partial(server.handle_reply, protocol)` as a connection's send.
    if not isinstance(send, functools.partial) or len(send.args) != 1:
        return None
    handler, protocol = send.func, send.args[0]
    if getattr(handler, "__qualname__", "") != "Server.handle_reply":
        return None
    transport = getattr(protocol, "transport", None)
    needed = (
        "STATE_OPEN",
        "state",
        "send_queue",
        "_perMessageCompress",
        "maxMessagePayloadSize",
        "autoFragmentSize",
    )
    if transport is None or not all(hasattr(protocol, name) for name in needed):
        return None
    if getattr(transport, "TLS", False) or ISSLTransport.providedBy(transport):
        # Twisted encrypts what it writes: its own write only. (daphne's ssl: endpoint wraps
        # the TCP transport in a TLS protocol that passes every attribute through.)
        return None
    if not all(
        hasattr(transport, name)
        for name in ("socket", "dataBuffer", "_tempDataBuffer", "connected", "disconnecting")
    ):
        return None
    return protocol
