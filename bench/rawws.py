"""
A minimal WebSocket client on asyncio streams, for the idle-memory workload: thousands of
connections that connect, read the greeting, and then sit idle. They answer heartbeats only
(WebSocket pings with pongs; Engine.IO's "2" with "3", without which the Socket.IO server drops
a client after ~45 s) and never send anything else. A few KiB each on the client side, so one
process holds 5,000 of them easily.
"""

import asyncio
import base64
import contextlib
import json
import os
import struct
import time

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    n = len(payload)
    whole = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(whole, "little")).to_bytes(
        n, "little"
    )


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """
    One final, masked client frame.
    """
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + key + _mask(payload, key)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """
    The next frame as (opcode, payload); fragments are returned as they come.
    """
    b1, b2 = await reader.readexactly(2)
    opcode, n = b1 & 0x0F, b2 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    key = await reader.readexactly(4) if b2 & 0x80 else None
    payload = await reader.readexactly(n) if n else b""
    if key:
        payload = _mask(payload, key)
    return opcode, payload


class IdleConnection:
    """
    One idle socket. `kind` is "ours" (expects a hello frame) or "peer" (Engine.IO v4 + the
    Socket.IO CONNECT of the default namespace, with the tutorial page's auth).
    """

    def __init__(self, kind: str, host: str, port: int, path: str, headers: dict) -> None:
        self.kind, self.host, self.port, self.path, self.headers = kind, host, port, path, headers
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None
        self.open = False

    async def connect(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self._connect(), timeout)
        self.open = True
        self.task = asyncio.create_task(self._idle())

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in self.headers.items()),
        ]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise ConnectionError(f"handshake refused: {status.decode(errors='replace')}")
        if self.kind == "ours":
            _, payload = await self._next_data()
            frame = json.loads(payload)
            if frame.get("type") != "hello":
                raise ConnectionError(f"expected hello, got {frame!r}")
        else:
            _, payload = await self._next_data()
            if not payload.startswith(b"0"):
                raise ConnectionError(f"expected an Engine.IO open packet, got {payload[:80]!r}")
            # Socket.IO CONNECT to "/", with the auth of a freshly loaded tutorial page.
            self._send(OP_TEXT, b'40{"serverOffset":0}')
            while True:
                _, payload = await self._next_data()
                if payload.startswith(b"40"):
                    break
                if payload.startswith(b"44"):
                    raise ConnectionError(f"connect refused: {payload[:200]!r}")

    async def _next_data(self) -> tuple[int, bytes]:
        assert self.reader is not None
        while True:
            opcode, payload = await read_frame(self.reader)
            if opcode == OP_PING:
                self._send(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                raise ConnectionError(f"closed by the server: {payload[:2].hex()}")
            elif opcode in (OP_TEXT, OP_BINARY, OP_CONT):
                if self.kind == "peer" and payload == b"2":
                    self._send(OP_TEXT, b"3")  # Engine.IO heartbeat
                    continue
                return opcode, payload

    def _send(self, opcode: int, payload: bytes) -> None:
        assert self.writer is not None
        self.writer.write(encode_frame(opcode, payload))

    async def _idle(self) -> None:
        try:
            while True:
                await self._next_data()  # presence frames and the like: read and dropped
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self.open = False

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self._send(OP_CLOSE, struct.pack("!H", 1000))
                self.writer.close()
        self.open = False


class IdlePool:
    """
    Many idle connections to one server, opened in bounded concurrency.
    """

    def __init__(self, kind: str, host: str, port: int) -> None:
        self.kind, self.host, self.port = kind, host, port
        self.conns: list[IdleConnection] = []
        self.errors: list[str] = []

    async def open(
        self, targets: list[tuple[str, dict]], concurrency: int = 50, timeout: float = 300.0
    ) -> dict:
        """
        Open one connection per (path, headers); bounded by `timeout` overall.
        """
        gate = asyncio.Semaphore(concurrency)
        t0 = time.monotonic()
        opened: list[IdleConnection] = []

        async def one(path: str, headers: dict) -> None:
            async with gate:
                conn = IdleConnection(self.kind, self.host, self.port, path, headers)
                try:
                    await conn.connect()
                    opened.append(conn)
                except Exception as exc:
                    await conn.close()
                    if len(self.errors) < 20:
                        self.errors.append(repr(exc))

        tasks = [asyncio.create_task(one(p, h)) for p, h in targets]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        self.conns.extend(opened)
        return {
            "opened": len(opened),
            "failed": len(targets) - len(opened),
            "seconds": round(time.monotonic() - t0, 2),
            "errors": self.errors[:5],
        }

    @property
    def alive(self) -> int:
        return sum(1 for c in self.conns if c.open)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.conns), return_exceptions=True)
        self.conns.clear()
