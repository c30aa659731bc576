"""
A PostgreSQL blip under load: every backend of a real daphne's database is terminated (a
failover, a restart, an idle-connection reaper) while tabs send over their sockets.

PostgreSQL only (SQLite has no server connections to lose); the PostgreSQL half of `make test`
runs it, and CI always does.
"""

import asyncio
import json
import os
import time
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import websockets

from chatproject.postgresql.pool import ConnectionPool
from harness.proxy import FaultProxy
from tests.servers import Deployment, Session

pytestmark = pytest.mark.skipif(
    not os.environ.get("DATABASE_URL"),
    reason="needs PostgreSQL (DATABASE_URL): the second half of make test",
)

USERS = ("alice", "bob", "carol")
TABS_PER_USER = 2
WARM_UP = 1.5  # seconds of steady sending before the fault
AFTER_FAULT = 3.0  # and after it
POOL_MIN = 8
# How soon a send is answered `unavailable` with the database unreachable: the pool waits
# failover_timeout (2 s) for a new connection once its connections broke; it used to wait its
# whole timeout (10 s).
UNAVAILABLE_BOUND = 5.0
# The longest a send may wait for its `sent` because of the fault, beyond the longest wait
# before it (what the machine's load costs anyway). On psycopg_pool's own check-on-checkout a
# send waited behind its backoff sleeps between broken connections: 1 + 2 + 4 s.
PAUSE_BOUND = 1.0


class Sender:
    """
    One tab over a real socket that sends to the room one message at a time, waits for each
    `sent` (resending the same client_msg_id after an error frame, as the browser's outbox
    does), and keeps every delivery it gets, acking them as it goes.
    """

    def __init__(self, name: str, session: Session, client_id: str) -> None:
        self.name = name
        self.session = session
        self.client_id = client_id
        self.ws = None
        self.deliveries: list[tuple[int, str]] = []  # (seq, body)
        self.waits: list[tuple[float, float]] = []  # (sent at, answered at) of each message
        self.errors: list[dict] = []
        self.sent = 0
        self.pongs = 0
        self._answer: asyncio.Future | None = None
        self.cmid = ""  # of the send waiting for its answer
        self._more = asyncio.Event()  # set on each delivery

    async def connect(self, server) -> None:
        url = f"{server.ws_url}/ws/?client_id={self.client_id}&after=0"
        self.ws = await websockets.connect(url, additional_headers=self.session.ws_headers())
        hello = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
        assert hello["type"] == "hello", hello

    async def read(self) -> None:
        async for text in self.ws:
            frame = json.loads(text)
            if frame["type"] == "delivery":
                self.deliveries.append((frame["seq"], frame["message"]["body"]))
                self._more.set()
                if frame["seq"] % 5 == 0:
                    await self.ws.send(json.dumps({"type": "ack", "seq": frame["seq"]}))
            elif frame["type"] == "pong":
                self.pongs += 1
            elif frame["type"] in ("sent", "error"):
                if frame["type"] == "error":
                    self.errors.append(frame)
                pending = self._answer
                if frame.get("client_msg_id") == self.cmid and pending and not pending.done():
                    pending.set_result(frame)

    async def received(self, count: int) -> None:
        while len(self.deliveries) < count:
            self._more.clear()
            await self._more.wait()

    async def send_until(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            cmid = self.cmid = f"{self.name}-{self.sent}"
            frame = {"type": "send", "client_msg_id": cmid, "to": {"room": "hall"}, "body": cmid}
            started = loop.time()
            while True:
                self._answer = loop.create_future()
                await self.ws.send(json.dumps(frame))
                answer = await asyncio.wait_for(self._answer, 20)
                if answer["type"] == "sent":
                    break
                await asyncio.sleep(0.1)  # an error frame: the outbox retries
            self.waits.append((started, loop.time()))
            self.sent += 1
            await asyncio.sleep(0.01)

    async def ping_until(self, stop: asyncio.Event, pinging: asyncio.Event) -> None:
        # Reads of the socket's queue alongside the sends, from the process's thread pool (a
        # busy process holds several pooled connections), while `pinging` is set.
        while not stop.is_set():
            await pinging.wait()
            await self.ws.send(json.dumps({"type": "ping"}))
            await asyncio.sleep(0.02)


def server_connections(deployment) -> int:
    # The server's backends of its database (this short-lived one not counted).
    with psycopg.connect(deployment.database_url, autocommit=True) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    return count


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(
        tmp_path,
        # Steady load, not rate limits, is under test (the pings too read through the pool).
        MESSAGING_SEND_RATE="1000.0",
        MESSAGING_SEND_BURST="1000",
        MESSAGING_USER_SEND_RATE="1000.0",
        MESSAGING_USER_SEND_BURST="1000",
        MESSAGING_PING_RATE="1000.0",
        MESSAGING_PING_BURST="1000",
        # A pool that holds several idle connections, as a busy process's does.
        DATABASE_POOL_MIN=str(POOL_MIN),
    )
    dep.populate({name: f"{name}-pass-1" for name in USERS}, {"hall": list(USERS)})
    yield dep
    dep.close()


async def test_terminated_backends_pause_socket_sends_for_under_a_second(deployment):
    """With every backend of the server's database terminated under load, each send gets its
    `sent` within a second of the fault (beyond what the load costs anyway) and no error frame,
    and each tab gets each message once, in order."""
    server = deployment.start()
    tabs = []
    for name in USERS:
        session = Session(server.base_url)
        session.login(name, f"{name}-pass-1")
        for n in range(TABS_PER_USER):
            status, body = session.request("POST", "/api/clients/")
            assert status == 201
            tabs.append(Sender(f"{name}{n}", session, body["client_id"]))
    for tab in tabs:
        await tab.connect(server)
    readers = [asyncio.create_task(tab.read()) for tab in tabs]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    senders = [asyncio.create_task(tab.send_until(stop)) for tab in tabs]
    pinging = asyncio.Event()
    pinging.set()
    senders += [asyncio.create_task(tab.ping_until(stop, pinging)) for tab in tabs]
    try:
        await asyncio.sleep(WARM_UP)
        # The pool holds its connections (they are what breaks), whatever the machine's load.
        for _ in range(100):
            if await asyncio.to_thread(server_connections, deployment) >= POOL_MIN:
                break
            await asyncio.sleep(0.05)
        # The pings pause around the fault, so that the sends (and acks) are the first to meet
        # the broken connections, as on a process whose other work is idle for a moment.
        pinging.clear()
        await asyncio.sleep(0.2)
        fault = loop.time()
        killed = await asyncio.to_thread(deployment.kill_database_connections)
        assert killed > 0
        await asyncio.sleep(1.0)
        pinging.set()
        await asyncio.sleep(AFTER_FAULT - 1.0)
        stop.set()
        pinging.set()
        await asyncio.wait_for(asyncio.gather(*senders), 30)

        # How long sends waited because of the fault: from the fault (or the send, if later);
        # and the longest wait before it, for the machine's load.
        pauses = [
            answered - max(started, fault)
            for tab in tabs
            for started, answered in tab.waits
            if answered > fault
        ]
        before = [a - s for tab in tabs for s, a in tab.waits if a <= fault]
        assert pauses and before and sum(tab.sent for tab in tabs) > len(tabs) * 5
        errors = [frame for tab in tabs for frame in tab.errors]
        print(
            f"killed {killed} backends; longest wait before the fault {max(before):.2f} s,"
            f" after it {max(pauses):.2f} s; error frames {errors}"
        )
        assert max(pauses) < PAUSE_BOUND + max(before), (sorted(pauses)[-5:], max(before))
        # A send that met a dropped connection was stored on another one, not refused.
        assert not [frame for frame in errors if "client_msg_id" in frame]

        # Every tab gets every message exactly once, in seq order, in one room order.
        total = sum(tab.sent for tab in tabs)
        await asyncio.wait_for(asyncio.gather(*(tab.received(total) for tab in tabs)), 20)
        await asyncio.sleep(0.2)  # anything doubled comes now
        expected = {f"{tab.name}-{i}" for tab in tabs for i in range(tab.sent)}
        order = [body for _, body in tabs[0].deliveries]
        for tab in tabs:
            seqs = [seq for seq, _ in tab.deliveries]
            bodies = [body for _, body in tab.deliveries]
            assert seqs == list(range(1, len(seqs) + 1)), f"{tab.name}: a gap or a repeat"
            assert len(bodies) == len(set(bodies)) == total, f"{tab.name}: lost or doubled"
            assert set(bodies) == expected
            assert bodies == order, f"{tab.name}: another room order"
    finally:
        stop.set()
        for task in (*senders, *readers):
            task.cancel()
        for tab in tabs:
            await tab.ws.close()


async def test_with_the_database_unreachable_a_send_is_answered_unavailable_soon(deployment):
    """With the database unreachable (its connections cut, new ones refused), a socket's send
    gets an `unavailable` frame within seconds, not after the pool's timeout; once the database
    is back, the tab's resend is stored, once."""
    parts = urlsplit(deployment.database_url)
    proxy = FaultProxy(parts.port or 5432)
    await proxy.start()
    deployment.env["DATABASE_URL"] = urlunsplit(
        parts._replace(netloc=f"{parts.netloc.rsplit('@', 1)[0]}@127.0.0.1:{proxy.port}")
    )
    try:
        # Blocking calls in threads: the proxy runs on this event loop.
        server = await asyncio.to_thread(deployment.start)
        session = Session(server.base_url)
        await asyncio.to_thread(session.login, "alice", "alice-pass-1")
        status, body = await asyncio.to_thread(session.request, "POST", "/api/clients/")
        assert status == 201
        tab = Sender("alice0", session, body["client_id"])
        await tab.connect(server)
        reader = asyncio.create_task(tab.read())
        loop = asyncio.get_running_loop()

        async def answer(cmid: str, timeout: float) -> dict:
            tab.cmid = cmid
            tab._answer = loop.create_future()
            frame = {"type": "send", "client_msg_id": cmid, "to": {"room": "hall"}, "body": cmid}
            await tab.ws.send(json.dumps(frame))
            return await asyncio.wait_for(tab._answer, timeout)

        assert (await answer("m1", 10))["type"] == "sent"
        await proxy.stop()  # every connection cut; new ones refused
        started = loop.time()
        refused = await answer("m2", 30)
        waited = loop.time() - started
        assert (refused["type"], refused.get("code")) == ("error", "unavailable"), refused
        assert waited < UNAVAILABLE_BOUND, waited

        await proxy.start()  # back, on the same port
        deadline = loop.time() + 30
        while (stored := await answer("m2", 30))["type"] != "sent":
            assert loop.time() < deadline, "not stored once the database was back"
            await asyncio.sleep(0.3)
        assert stored["duplicate"] is False
        await asyncio.wait_for(tab.received(2), 10)
        await asyncio.sleep(0.2)
        assert [body for _, body in tab.deliveries] == ["m1", "m2"]
        print(f"unavailable after {waited:.2f} s")
        reader.cancel()
        await tab.ws.close()
    finally:
        await proxy.stop()


def test_a_pool_of_broken_connections_hands_out_a_new_one_at_once(deployment):
    """With every connection of the pool terminated, a checkout discards them without sleeping
    (psycopg_pool's own check sleeps 1, 2, 4 s between them) and gets a working new one."""
    pool = ConnectionPool(
        deployment.database_url, min_size=6, check=ConnectionPool.check_connection, open=False
    )
    pool.open(wait=True, timeout=10)
    try:
        assert deployment.kill_database_connections() >= 6
        time.sleep(0.2)  # the backends are gone by now
        started = time.monotonic()
        conn = pool.getconn()
        took = time.monotonic() - started
        try:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            pool.putconn(conn)
        assert took < 0.5, took
    finally:
        pool.close()
