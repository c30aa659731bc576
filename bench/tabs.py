"""
One benchmark tab with the same small interface for both servers: ours through the project's
asyncio client (relayclient.RelayClient), the peer through the Socket.IO tutorial page's driver
(bench.peers.socketio.client.SocketIOTab). Every message carries a token; `on_token(index, token)`
is called once per message a tab processes (each client drops duplicates itself).

A tab spec is a picklable dict (it crosses into worker processes):
  ours: {"kind": "ours", "url", "user", "password", "cookies": [http.cookiejar.Cookie], "room"}
  peer: {"kind": "peer", "url"}
"""

import asyncio
import time
from collections.abc import Callable
from typing import Any

OnToken = Callable[[int, str], None]

SEND_TIMEOUT = 120.0


class OursTab:
    """
    A RelayClient in one room; sends wait for the server's `sent` frame (stored).
    """

    kind = "ours"

    def __init__(
        self, spec: dict, index: int, on_token: OnToken, state: dict | None = None
    ) -> None:
        from relayclient import RelayClient

        self.spec, self.index, self.on_token = spec, index, on_token
        self.room = spec["room"]
        self.client = RelayClient(
            spec["url"],
            spec["user"],
            spec["password"],
            state=state,
            on_message=self._on_message,
            ack_delay=spec.get("ack_delay", 0.2),
            http_fallback_after=15.0,
            ping_interval=30.0,
        )
        # One login per user, shared by its tabs as a browser's tabs share the session cookie.
        for cookie in spec.get("cookies") or []:
            self.client.http.jar.set_cookie(cookie)

    def _on_message(self, seq: int, message: dict) -> None:
        body = message.get("body")
        if isinstance(body, dict) and isinstance(body.get("k"), str):
            self.on_token(self.index, body["k"])

    @property
    def state(self) -> dict:
        return self.client.state

    async def start(self, timeout: float = 60.0) -> None:
        await self.client.start()
        deadline = time.monotonic() + timeout
        while self.client.status != "online":
            if time.monotonic() > deadline:
                raise TimeoutError(f"tab {self.index} not online after {timeout}s")
            await asyncio.sleep(0.02)

    async def send(self, token: str, pad: str, wait: bool = True) -> None:
        cmid = await self.client.send({"room": self.room}, {"k": token, "p": pad}, token)
        if wait:
            await self.client.wait_sent(cmid, timeout=SEND_TIMEOUT)

    def reconnects(self) -> int:
        """
        Connections after the first (socket drops, keepalive timeouts, 4409s).
        """
        return max(0, self.client.stats["connects"] - 1)

    def resyncs(self) -> int:
        return self.client.stats["resyncs"]

    async def unacked(self) -> int:
        """
        Deliveries the server still holds for this tab (0 once every delivery was acked).
        """
        status, page = await self.client.http.request(
            "GET", f"/api/clients/{self.client.client_id}/messages?after=0&limit=1000"
        )
        if status != 200:
            raise RuntimeError(f"GET messages: {status} {page}")
        return len(page["deliveries"])

    async def stop(self) -> None:
        await self.client.stop()


class PeerTab:
    """
    One tutorial page (socket.io-client's acks with retries, serverOffset, recovery) on the
    websocket transport from the start (a browser starts with polling and upgrades; the steady
    state is the same socket).
    """

    kind = "peer"

    def __init__(self, spec: dict, index: int, on_token: OnToken, initial_offset: int = 0) -> None:
        from bench.peers.socketio.client import SocketIOTab

        self.spec, self.index, self.on_token = spec, index, on_token
        self.tab = SocketIOTab(
            spec["url"],
            on_message=self._on_message,
            initial_offset=initial_offset,
            transports=["websocket"],
        )
        self._pending: set[asyncio.Task] = set()

    def _on_message(self, offset: int, content: Any) -> None:
        if isinstance(content, str):
            self.on_token(self.index, content.split(" ", 1)[0])

    async def start(self, timeout: float = 60.0) -> None:
        await self.tab.start()

    def reconnects(self) -> int:
        return max(0, self.tab.stats.connects - 1)

    def resyncs(self) -> int:
        return 0

    async def send(self, token: str, pad: str, wait: bool = True) -> None:
        if wait:
            await asyncio.wait_for(self.tab.send(f"{token} {pad}"), SEND_TIMEOUT)
        else:
            task = asyncio.create_task(self.tab.send(f"{token} {pad}"))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def stop(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await self.tab.stop()


def make_tab(spec: dict, index: int, on_token: OnToken, **kwargs: Any) -> OursTab | PeerTab:
    """
    The tab for a spec.
    """
    if spec["kind"] == "ours":
        return OursTab(spec, index, on_token, **kwargs)
    return PeerTab(spec, index, on_token, **kwargs)
