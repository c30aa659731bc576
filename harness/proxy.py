"""
A loopback TCP proxy in front of one server, for network faults: cut connections abruptly, or
freeze them (half-open: both ends still think they are connected, and nothing passes).
"""

import asyncio
import contextlib
import logging
import random

logger = logging.getLogger(__name__)


class _Link:
    """
    One proxied connection: a pump each way, which a freeze stops without closing anything.
    """

    def __init__(self, client: tuple, upstream: tuple) -> None:
        self.client_reader, self.client_writer = client
        self.up_reader, self.up_writer = upstream
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def run(self) -> None:
        pumps = [
            asyncio.create_task(self._pump(self.client_reader, self.up_writer)),
            asyncio.create_task(self._pump(self.up_reader, self.client_writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            self.cut()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()

    def cut(self) -> None:
        """
        Abort both sides at once (a reset, no close handshake).
        """
        self.client_writer.transport.abort()
        self.up_writer.transport.abort()

    def freeze(self) -> None:
        """
        Stop passing bytes either way; both ends stay open.
        """
        self.flowing.clear()


class FaultProxy:
    """
    Listens on a loopback port (a free one by default) and forwards every connection to
    `backend_port`.
    """

    def __init__(self, backend_port: int, port: int = 0) -> None:
        self.backend_port = backend_port
        self.links: set[_Link] = set()
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """
        Start listening (on `port`, or on a free one: see `port`); again after `stop`, on the
        same port, as a server that comes back.
        """
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """
        Stop listening and cut every connection.
        """
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.cut()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.transport.abort()  # the server is down: refuse as it would
            return
        link = _Link((reader, writer), upstream)
        self.links.add(link)
        try:
            await link.run()
        except asyncio.CancelledError:
            pass  # the event loop is shutting down: the link is cut already
        finally:
            self.links.discard(link)

    def cut(self, count: int, rng: random.Random) -> int:
        """
        Abort `count` random connections; returns how many were cut.
        """
        chosen = rng.sample(sorted(self.links, key=id), min(count, len(self.links)))
        for link in chosen:
            link.cut()
        return len(chosen)

    def freeze(self, count: int, rng: random.Random, seconds: float) -> int:
        """
        Make `count` random connections half-open for `seconds`, then cut them (by then both
        ends should have noticed by their keepalives); returns how many were frozen.
        """
        flowing = sorted((link for link in self.links if link.flowing.is_set()), key=id)
        chosen = rng.sample(flowing, min(count, len(flowing)))
        loop = asyncio.get_running_loop()
        for link in chosen:
            link.freeze()
            loop.call_later(seconds, link.cut)
        return len(chosen)
