"""
Several daphne processes, one deployment: real Redis, real PostgreSQL, real processes.

They need a shared channel layer and database, so they run in the PostgreSQL + Redis half of
`make test` (which CI always runs) and skip, saying why, on the in-memory defaults.
"""

import asyncio
import json
import os

import pytest
import websockets

from tests.servers import Deployment, Session

pytestmark = pytest.mark.skipif(
    not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")),
    reason="needs PostgreSQL + Redis (DATABASE_URL, REDIS_URL): the second half of make test",
)

FAST_LIVENESS = {
    "CLIENTS_HEARTBEAT_INTERVAL": "1",
    "CLIENTS_PROCESS_TIMEOUT": "4",
    "CLIENTS_CLEANUP_INTERVAL": "1",
    "MESSAGING_SEND_RATE": "1000.0",
    "MESSAGING_SEND_BURST": "1000",
    "MESSAGING_USER_SEND_RATE": "1000.0",
    "MESSAGING_USER_SEND_BURST": "1000",
}


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(tmp_path, **FAST_LIVENESS)
    users = ("alice", "bob")
    dep.populate({name: f"{name}-pass-1" for name in users}, {"hall": list(users)})
    yield dep
    dep.close()


class Tab:
    """
    A raw protocol tab over a real socket: remembers its last seq and acks what it got.
    """

    def __init__(self, session: Session, client_id: str) -> None:
        self.session = session
        self.client_id = client_id
        self.ws = None
        self.last_seq = 0
        self.bodies: list = []
        self.other: list[dict] = []

    async def connect(self, server) -> dict:
        url = f"{server.ws_url}/ws/?client_id={self.client_id}&after={self.last_seq}"
        headers = self.session.ws_headers(server.base_url)
        self.ws = await websockets.connect(url, additional_headers=headers)
        return await self.recv()

    async def recv(self, timeout: float = 10) -> dict:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def send(self, cmid: str, to: dict, body) -> None:
        await self.ws.send(
            json.dumps({"type": "send", "client_msg_id": cmid, "to": to, "body": body})
        )

    async def collect(self, count: int, timeout: float = 20) -> list:
        """
        Read until `count` new deliveries arrived, checking they are in seq order with no gap.
        """

        async def loop():
            got = []
            while len(got) < count:
                frame = await self.recv(timeout)
                if frame["type"] != "delivery":
                    self.other.append(frame)
                    continue
                assert frame["seq"] == self.last_seq + 1, (frame["seq"], self.last_seq)
                self.last_seq = frame["seq"]
                got.append(frame["message"]["body"])
            await self.ws.send(json.dumps({"type": "ack", "seq": self.last_seq}))
            return got

        got = await asyncio.wait_for(loop(), timeout)
        self.bodies.extend(got)
        return got

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


def login(server, name: str) -> Session:
    session = Session(server.base_url)
    session.login(name, f"{name}-pass-1")
    return session


def new_tab(session: Session) -> Tab:
    status, body = session.request("POST", "/api/clients/")
    assert status == 201
    return Tab(session, body["client_id"])


async def test_message_through_one_process_reaches_a_tab_on_another(deployment):
    """A send on process A reaches, in real time, a tab connected to process B."""
    a, b = deployment.start(), deployment.start()
    alice, bob = new_tab(login(a, "alice")), new_tab(login(b, "bob"))
    await alice.connect(a)
    await bob.connect(b)
    await alice.send("x1", {"user": "bob"}, {"n": 1})
    assert await bob.collect(1, timeout=5) == [{"n": 1}]
    await alice.close()
    await bob.close()


async def test_pokes_for_several_tabs_on_another_process_arrive_in_one_batch(deployment):
    """The pokes of one send for several tabs of another process travel there as one message
    and its router hands each to its socket: real time, in order, once (these tabs never ping,
    so nothing but the pokes can bring them their deliveries)."""
    a, b = deployment.start(), deployment.start()
    sender = new_tab(login(a, "alice"))
    on_b = [new_tab(login(b, "bob")), new_tab(login(b, "bob")), new_tab(login(b, "alice"))]
    await sender.connect(a)
    for tab in on_b:
        await tab.connect(b)
    for i in range(5):
        await sender.send(f"h{i}", {"room": "hall"}, {"n": i})
    for tab in on_b:
        assert await tab.collect(5, timeout=5) == [{"n": i} for i in range(5)]
    assert await sender.collect(5, timeout=5) == [{"n": i} for i in range(5)]
    for tab in (sender, *on_b):
        await tab.close()


async def test_reconnect_to_the_other_process_resumes_exactly(deployment):
    """A tab that moves from A to B with after=N gets exactly what it has not seen."""
    a, b = deployment.start(), deployment.start()
    sender = login(a, "alice")
    _, body = sender.request("POST", "/api/clients/")
    sender_id = body["client_id"]
    bob = new_tab(login(a, "bob"))
    await bob.connect(a)
    for i in range(5):
        status, _ = sender.request(
            "POST",
            "/api/messages/",
            {"client_id": sender_id, "client_msg_id": str(i), "to": {"user": "bob"}, "body": i},
        )
        assert status == 201
    assert await bob.collect(5) == [0, 1, 2, 3, 4]
    await bob.close()
    for i in range(5, 9):
        status, _ = sender.request(
            "POST",
            "/api/messages/",
            {"client_id": sender_id, "client_msg_id": str(i), "to": {"user": "bob"}, "body": i},
        )
        assert status == 201
    hello = await bob.connect(b)
    assert hello["head"] == 9
    assert await bob.collect(4) == [5, 6, 7, 8]
    await asyncio.sleep(0.3)
    assert not [f for f in bob.other if f["type"] == "delivery"]
    await bob.close()


async def test_supersede_holds_across_processes(deployment):
    """The same client connecting on B closes its socket on A with 4409."""
    a, b = deployment.start(), deployment.start()
    session = login(a, "alice")
    first = new_tab(session)
    await first.connect(a)
    second = Tab(session, first.client_id)
    await second.connect(b)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await first.recv(timeout=10)
    assert closed.value.rcvd.code == 4409
    await second.close()


async def test_sigkill_while_messages_flow_loses_and_doubles_nothing(deployment):
    """Tabs on a process killed with SIGKILL mid-stream reconnect to the survivor with after=N
    and end with every message exactly once, in order."""
    a, b = deployment.start(), deployment.start()
    sender = login(b, "alice")
    _, body = sender.request("POST", "/api/clients/")
    sender_id = body["client_id"]
    bob_session = login(a, "bob")
    tabs = [new_tab(bob_session) for _ in range(3)]
    for tab in tabs:
        await tab.connect(a)
    total = 60

    async def send_all():
        for i in range(total):
            status, _ = await asyncio.to_thread(
                sender.request,
                "POST",
                "/api/messages/",
                {
                    "client_id": sender_id,
                    "client_msg_id": f"m{i}",
                    "to": {"room": "hall"},
                    "body": i,
                },
            )
            assert status == 201
            if i == total // 3:
                a.kill()

    async def read_until_cut(tab):
        try:
            while True:
                frame = await tab.recv(timeout=15)
                if frame["type"] == "delivery":
                    assert frame["seq"] == tab.last_seq + 1
                    tab.last_seq = frame["seq"]
                    tab.bodies.append(frame["message"]["body"])
        except (websockets.ConnectionClosed, OSError, TimeoutError):
            return

    await asyncio.gather(send_all(), *(read_until_cut(t) for t in tabs))
    for tab in tabs:
        hello = await tab.connect(b)
        assert hello["type"] == "hello"
        await tab.collect(total - len(tab.bodies))
        assert tab.bodies == list(range(total)), "lost, doubled or reordered"
        await tab.close()


async def test_presence_crosses_processes_and_heals_when_one_dies(deployment):
    """bob on B sees alice (on A) come online; when A is SIGKILLed, B's cleanup notices the
    silent process and bob sees alice go offline."""
    a, b = deployment.start(), deployment.start()
    bob = new_tab(login(b, "bob"))
    await bob.connect(b)
    alice = new_tab(login(a, "alice"))
    await alice.connect(a)

    async def presence_of(user, online, timeout):
        async def wait():
            while True:
                frame = await bob.recv(timeout)
                if frame == {"type": "presence", "user": user, "online": online}:
                    return

        await asyncio.wait_for(wait(), timeout)

    await presence_of("alice", True, 10)
    a.kill()
    await presence_of("alice", False, 20)
    await bob.close()


async def test_a_server_with_sockets_stops_promptly_on_sigterm(deployment):
    """SIGTERM ends a process with open sockets (and its router of batched pokes, waiting on
    Redis) within a few seconds: no task of it outlives its sockets."""
    import signal
    import time

    a, b = deployment.start(), deployment.start()
    sender = new_tab(login(b, "alice"))
    on_a = [new_tab(login(a, "bob")), new_tab(login(a, "bob"))]
    await sender.connect(b)
    for tab in on_a:
        await tab.connect(a)
    await sender.send("s1", {"room": "hall"}, {"n": 1})  # batched pokes through a's router
    for tab in on_a:
        assert await tab.collect(1, timeout=5) == [{"n": 1}]
    started = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(a.proc.wait, 15)
    assert time.monotonic() - started < 5.0
    await sender.close()
