"""Asyncio driver of the Socket.IO tutorial's chat server (``server.js`` here).

One :class:`SocketIOTab` behaves like one browser tab running the tutorial's
page after its step #8 ("Client delivery") with the socket.io-client library
underneath, so that the benchmark compares tabrelay with what that page does:

* ``auth = {serverOffset}`` is sent on every (re)connection; ``serverOffset`` is
  set from every ``chat message`` received, as the page does
  (``socket.auth.serverOffset = serverOffset``). A tab starts at 0, as a page
  load does, so the server replays the whole history to it.
* Sends go through socket.io-client's ``retries``/``ackTimeout`` queue
  (``retries: 3, ackTimeout: 10000`` in the tutorial): one message in flight at
  a time, in order; each try waits for the server's ack up to ``ack_timeout``;
  a disconnection fails the try at once and the message is sent again (same
  client offset) as soon as the socket is connected; after ``retries + 1``
  tries socket.io-client drops the message, and :meth:`SocketIOTab.send` then
  raises :class:`SendFailed` (``retries=None`` retries without limit).
* The client offset is ``f"{socket.id}-{counter}"`` as in the tutorial.
* Connection state recovery as socket.io-client implements it: the ``pid`` from
  the server's CONNECT packet and the last string argument of each event (the
  offset the server appends to every broadcast while recovery is on) are sent
  back in the CONNECT auth on reconnection; ``recovered`` tells whether the
  server restored the session (then it sends the missed broadcasts itself and
  skips the SQLite replay).
* Reconnection with socket.io-client's default back-off (1 s doubling to 5 s,
  randomization 0.5; the delay also applies to the first reconnection).
* The page appends every ``chat message`` it gets, duplicates included; this
  driver drops duplicates by server offset (counted in ``duplicates``) and
  passes each message once to ``on_message(offset, content)``.

Deviation kept on purpose: the tutorial computes the client offset from
``socket.id`` even while disconnected (``"undefined-N"``, which two tabs can
share); here a random per-tab id stands in while there is no socket id.

Also: :func:`start_server` / :class:`ServerHandle` to run ``server.js`` (run
``bench/peers/socketio/setup`` once first) and :func:`rss_bytes`.

Python requirement: ``python-socketio[asyncio_client]>=5.18,<6`` (pulls aiohttp).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import math
import os
import random
import secrets
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import socketio
from socketio import exceptions as sio_exceptions

__all__ = [
    "HERE",
    "SERVER_JS",
    "SendFailed",
    "ServerHandle",
    "SocketIOTab",
    "rss_bytes",
    "start_server",
]

HERE = Path(__file__).resolve().parent
SERVER_JS = HERE / "server.js"

OnMessage = Callable[[int, str], Awaitable[None] | None]


class SendFailed(Exception):
    """socket.io-client gave up on a message after ``retries + 1`` tries."""

    def __init__(self, client_offset: str, tries: int, reason: str):
        super().__init__(f"message {client_offset!r} dropped after {tries} tries ({reason})")
        self.client_offset = client_offset
        self.tries = tries
        self.reason = reason


class _Backoff:
    """socket.io-client's reconnection back-off (its contrib/backo2)."""

    def __init__(self, min_s: float, max_s: float, jitter: float, factor: float = 2.0):
        self.min_s = min_s
        self.max_s = max_s
        self.jitter = jitter if 0 < jitter <= 1 else 0.0
        self.factor = factor
        self.attempts = 0

    def duration(self) -> float:
        ms = self.min_s * 1000.0 * math.pow(self.factor, self.attempts)
        self.attempts += 1
        if self.jitter:
            rand = random.random()
            deviation = math.floor(rand * self.jitter * ms)
            ms = ms - deviation if (math.floor(rand * 10) & 1) == 0 else ms + deviation
        return min(ms, self.max_s * 1000.0) / 1000.0

    def reset(self) -> None:
        self.attempts = 0


class _Client(socketio.AsyncClient):
    """AsyncClient that lets the tab see the CONNECT packet's data (``pid``)."""

    def __init__(self, tab: SocketIOTab, **kwargs: Any):
        super().__init__(**kwargs)
        self._tab = tab

    async def _handle_connect(self, namespace, data):  # type: ignore[override]
        self._tab._on_connect_packet(namespace, data)
        await super()._handle_connect(namespace, data)


@dataclass
class _Outgoing:
    content: str
    client_offset: str
    future: asyncio.Future[None]
    tries: int = 0


@dataclass
class TabStats:
    connects: int = 0
    recovered_connects: int = 0
    disconnects: int = 0
    received: int = 0  # every chat message event, duplicates included
    delivered: int = 0  # passed to on_message
    duplicates: int = 0
    sends_acked: int = 0
    sends_failed: int = 0
    tries: int = 0  # emits of chat message, first tries and retries
    ack_timeouts: int = 0
    connect_errors: int = 0


class SocketIOTab:
    """One browser tab of the tutorial's chat page, driven from asyncio."""

    def __init__(
        self,
        base_url: str,
        on_message: OnMessage | None = None,
        *,
        initial_offset: int = 0,
        ack_timeout: float = 10.0,
        retries: int | None = 3,
        recovery: bool = True,
        transports: list[str] | None = None,
        reconnection_delay: float = 1.0,
        reconnection_delay_max: float = 5.0,
        randomization_factor: float = 0.5,
        connect_timeout: float = 20.0,
    ):
        self.base_url = base_url
        self._on_message = on_message
        self._ack_timeout = ack_timeout
        self._retries = retries
        self._recovery = recovery
        self._transports = transports
        self._connect_timeout = connect_timeout
        self._backoff = _Backoff(reconnection_delay, reconnection_delay_max, randomization_factor)

        # socket.auth.serverOffset of the tutorial page
        self._server_offset = int(initial_offset)
        # duplicate detection: every offset <= _floor was seen, plus _above
        self._floor = int(initial_offset)
        self._above: set[int] = set()

        # connection state recovery (socket.io-client's _pid / _lastOffset)
        self._pid: str | None = None
        self._csr_offset: str | None = None
        self.recovered = False

        self._tab_id = secrets.token_urlsafe(15)[:20]
        self._counter = 0
        self._queue: collections.deque[_Outgoing] = collections.deque()
        self._queue_event = asyncio.Event()
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self._hold = asyncio.Event()  # cleared: do not reconnect until resume()
        self._hold.set()
        self._wake = asyncio.Event()  # cuts a back-off sleep short (resume/stop)

        self._sio: _Client | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._deliveries: asyncio.Queue[Awaitable[None]] | None = None
        self._delivery_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._started = False
        self.last_error: BaseException | None = None
        self.stats = TabStats()

    # ------------------------------------------------------------------ API

    @property
    def last_offset(self) -> int:
        """The page's ``socket.auth.serverOffset``: offset of the last message received."""
        return self._server_offset

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def socket_id(self) -> str | None:
        if self._sio is None or not self._connected.is_set():
            return None
        try:
            return self._sio.get_sid("/")
        except Exception:
            return None

    @property
    def pending(self) -> int:
        """Messages queued or in flight (not acked, not dropped)."""
        return len(self._queue)

    async def start(self) -> None:
        """Connect (like a page load); returns once connected or raises ConnectionError."""
        if self._started:
            raise RuntimeError("SocketIOTab already started")
        self._started = True
        self._sio = _Client(
            self,
            reconnection=False,  # reconnection is done here, with socket.io-client's back-off
            handle_sigint=False,
            logger=False,
            engineio_logger=False,
        )
        self._sio.on("connect", self._on_connect)
        self._sio.on("disconnect", self._on_disconnect)
        self._sio.on("chat message", self._on_chat_message)
        self._supervisor = asyncio.create_task(self._supervise(), name="socketio-tab-supervisor")
        self._sender = asyncio.create_task(self._send_loop(), name="socketio-tab-sender")
        try:
            await asyncio.wait_for(self._connected.wait(), self._connect_timeout)
        except TimeoutError:
            err = self.last_error
            await self.stop()
            raise ConnectionError(f"could not connect to {self.base_url}: {err!r}") from err

    async def send(self, content: str) -> None:
        """Queue a chat message; return when the server acked it.

        Raises :class:`SendFailed` when socket.io-client would have dropped it
        (``retries + 1`` tries without an ack), ConnectionError if the tab stops.
        """
        if not self._started or self._stopping:
            raise RuntimeError("SocketIOTab is not running")
        client_offset = f"{self.socket_id or self._tab_id}-{self._counter}"
        self._counter += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Outgoing(content, client_offset, fut))
        self._queue_event.set()
        await fut

    async def stop(self) -> None:
        """Close the tab: stop reconnecting, disconnect, fail unsent messages."""
        if self._stopping:
            return
        self._stopping = True
        self._hold.set()
        self._wake.set()
        for task in (self._supervisor, self._sender, self._delivery_task):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._supervisor, self._sender, self._delivery_task):
            if task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(task), 5)
                except (TimeoutError, asyncio.CancelledError, Exception):
                    pass
        if self._sio is not None:
            try:
                if self._sio.connected:
                    await asyncio.wait_for(self._sio.disconnect(), 5)
                else:
                    await asyncio.wait_for(self._sio.eio.disconnect(abort=True), 5)
            except Exception:
                pass
        self._connected.clear()
        self._disconnected.set()
        while self._queue:
            out = self._queue.popleft()
            if not out.future.done():
                out.future.set_exception(ConnectionError("tab stopped"))

    async def kill_connection(self, hold: bool = False) -> None:
        """Cut the connection the way a network failure does.

        The engine.io transport is closed without a Socket.IO DISCONNECT, so the
        server sees "transport close" and (with recovery on) keeps the session
        for connection state recovery. With ``hold=False`` the tab reconnects by
        itself after the back-off delay; with ``hold=True`` it stays offline
        until :meth:`resume`.
        """
        if hold:
            self._hold.clear()
        sio = self._sio
        if sio is not None and sio.eio.state == "connected":
            await sio.eio.disconnect(abort=True)
        try:
            await asyncio.wait_for(self._disconnected.wait(), 5)
        except TimeoutError:
            pass

    def resume(self) -> None:
        """Let a tab held offline by ``kill_connection(hold=True)`` reconnect now."""
        self._hold.set()
        self._wake.set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    # ------------------------------------------------------ socket.io events

    def _on_connect_packet(self, namespace: str | None, data: Any) -> None:
        # socket.io-client's Socket.onconnect(id, pid)
        if (namespace or "/") != "/":
            return
        pid = data.get("pid") if isinstance(data, dict) else None
        self.recovered = bool(pid) and pid == self._pid
        self._pid = pid if self._recovery else None

    def _on_connect(self) -> None:
        self.stats.connects += 1
        if self.recovered:
            self.stats.recovered_connects += 1
        self._backoff.reset()
        self._disconnected.clear()
        self._connected.set()

    def _on_disconnect(self, reason: Any = None) -> None:
        self.stats.disconnects += 1
        self._connected.clear()
        self._disconnected.set()

    def _on_chat_message(self, *args: Any) -> None:
        # Runs synchronously, without suspending: python-engineio starts one task
        # per packet, so not yielding here keeps the arrival order.
        if self._pid and args and isinstance(args[-1], str):
            self._csr_offset = args[-1]  # socket.io-client's _lastOffset
        if len(args) < 2:
            return
        content, offset = args[0], int(args[1])
        self.stats.received += 1
        self._server_offset = offset  # socket.auth.serverOffset = serverOffset
        if offset <= self._floor or offset in self._above:
            self.stats.duplicates += 1
            return
        self._above.add(offset)
        while self._floor + 1 in self._above:
            self._floor += 1
            self._above.discard(self._floor)
        self.stats.delivered += 1
        if self._on_message is not None:
            result = self._on_message(offset, content)
            if inspect.isawaitable(result):
                self._deliver_later(result)

    def _deliver_later(self, aw: Awaitable[None]) -> None:
        if self._deliveries is None:
            self._deliveries = asyncio.Queue()
            self._delivery_task = asyncio.create_task(self._delivery_loop())
        self._deliveries.put_nowait(aw)

    async def _delivery_loop(self) -> None:
        assert self._deliveries is not None
        while True:
            aw = await self._deliveries.get()
            await aw

    # ------------------------------------------------------------ internals

    def _auth(self) -> dict[str, Any]:
        auth: dict[str, Any] = {}
        if self._recovery and self._pid:
            # socket.io-client: Object.assign({ pid, offset }, auth); undefined is not sent
            auth["pid"] = self._pid
            if self._csr_offset is not None:
                auth["offset"] = self._csr_offset
        auth["serverOffset"] = self._server_offset
        return auth

    async def _sleep_or_wake(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass

    async def _supervise(self) -> None:
        assert self._sio is not None
        sio = self._sio
        while not self._stopping:
            await self._hold.wait()
            if self._stopping:
                break
            try:
                await sio.connect(
                    self.base_url,
                    auth=self._auth,
                    transports=self._transports,
                    wait_timeout=self._connect_timeout,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # ConnectionError, ValueError, aiohttp errors
                self.last_error = exc
                self.stats.connect_errors += 1
                try:
                    await sio.eio.disconnect(abort=True)
                except Exception:
                    pass
                if self._hold.is_set():
                    await self._sleep_or_wake(self._backoff.duration())
                continue
            await self._disconnected.wait()
            if self._stopping:
                break
            if self._hold.is_set():
                await self._sleep_or_wake(self._backoff.duration())

    async def _send_loop(self) -> None:
        assert self._sio is not None
        sio = self._sio
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._queue_event.clear()
                await self._queue_event.wait()
            out = self._queue[0]
            await self._connected.wait()
            out.tries += 1
            self.stats.tries += 1
            ack: asyncio.Future[tuple[Any, ...]] = loop.create_future()

            def on_ack(*args: Any, _ack: asyncio.Future = ack) -> None:
                if not _ack.done():
                    _ack.set_result(args)

            reason = ""
            try:
                await sio.emit("chat message", (out.content, out.client_offset), callback=on_ack)
            except (sio_exceptions.SocketIOError, OSError, ValueError) as exc:
                reason = f"emit failed: {exc!r}"
            else:
                disconnected = asyncio.ensure_future(self._disconnected.wait())
                try:
                    waiters: set[asyncio.Future[Any]] = {ack, disconnected}
                    await asyncio.wait(
                        waiters,
                        timeout=self._ack_timeout,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    disconnected.cancel()
                if not ack.done():
                    if self._disconnected.is_set():
                        reason = "socket has been disconnected"
                    else:
                        reason = "operation has timed out"
                        self.stats.ack_timeouts += 1
            if ack.done() and not reason:
                self._queue.popleft()
                self.stats.sends_acked += 1
                if not out.future.done():
                    out.future.set_result(None)
                continue
            if not ack.done():
                ack.cancel()
            if self._retries is not None and out.tries > self._retries:
                self._queue.popleft()
                self.stats.sends_failed += 1
                if not out.future.done():
                    out.future.set_exception(SendFailed(out.client_offset, out.tries, reason))
            # else: retried at once if still connected, else on reconnection


# ---------------------------------------------------------------- the server


@dataclass
class ServerHandle:
    """A running ``node server.js``."""

    process: asyncio.subprocess.Process
    port: int
    url: str
    db_path: Path
    log_path: Path
    workdir: Path
    _log: Any = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (the server closes its sockets and the database), SIGKILL after ``timeout``."""
        if self.process.returncode is None:
            try:
                self.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.kill()
                await self.process.wait()
        if self._log is not None and not self._log.closed:
            self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, for fault tests (the database file stays)."""
        if self.process.returncode is None:
            try:
                self.process.kill()
            except ProcessLookupError:
                pass


def _node_binary() -> str:
    node = os.environ.get("NODE") or shutil.which("node")
    if not node:
        raise RuntimeError(
            "node (Node.js) not found; install it and run bench/peers/socketio/setup"
        )
    return node


def _open_log(path: Path) -> Any:
    return open(path, "ab")  # handed to the child; ServerHandle.stop closes it


def _read_from(path: Path, pos: int) -> str:
    with open(path, "rb") as f:
        f.seek(pos)
        return f.read().decode("utf-8", "replace")


async def start_server(
    workdir: str | os.PathLike[str],
    port: int = 0,
    *,
    db_name: str = "chat.db",
    startup_timeout: float = 20.0,
) -> ServerHandle:
    """Start the tutorial server on 127.0.0.1:``port`` (0: any free port).

    The SQLite file is ``workdir/db_name`` and is kept between starts with the
    same ``workdir`` (restart tests); use a new workdir for an empty history.
    The server's output goes to ``workdir/server.log``.
    """
    if (
        not (HERE / "node_modules" / "socket.io").is_dir()
        or not (HERE / "node_modules" / "sqlite3").is_dir()
    ):
        raise RuntimeError(f"node modules missing: run {HERE / 'setup'}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    db_path = workdir / db_name
    log_path = workdir / "server.log"
    log = _open_log(log_path)
    start_pos = log.tell()
    proc = await asyncio.create_subprocess_exec(
        _node_binary(),
        str(SERVER_JS),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--db",
        str(db_path),
        cwd=str(HERE),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + startup_timeout
    actual_port: int | None = None
    while time.monotonic() < deadline:
        for line in _read_from(log_path, start_pos).splitlines():
            if line.startswith("listening on http://"):
                hostport = line.split()[2][len("http://") :]
                actual_port = int(hostport.rsplit(":", 1)[1])
                break
        if actual_port is not None:
            break
        if proc.returncode is not None:
            break
        try:
            await asyncio.wait_for(proc.wait(), 0.02)
        except TimeoutError:
            pass
    if actual_port is None:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        tail = _read_from(log_path, start_pos)[-2000:]
        raise RuntimeError(f"socket.io peer did not start (exit {proc.returncode}):\n{tail}")
    return ServerHandle(
        process=proc,
        port=actual_port,
        url=f"http://127.0.0.1:{actual_port}",
        db_path=db_path,
        log_path=log_path,
        workdir=workdir,
        _log=log,
    )


def rss_bytes(handle: ServerHandle | int) -> int:
    """Resident set size of the server process (VmRSS from /proc/<pid>/status)."""
    pid = handle if isinstance(handle, int) else handle.pid
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                parts = line.split()
                return int(parts[1]) * 1024  # kB
    raise RuntimeError(f"no VmRSS for pid {pid}")
