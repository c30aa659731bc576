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
