"""
One chaos run: a fresh deployment of real daphne processes, simulated tabs sending and acking
throughout while faults are injected at random (from a seed), a settle phase, then the checks.
"""

import asyncio
import contextlib
import json
import logging
import os
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from chaos.history import History
from harness.deployment import Deployment, Server
from harness.proxy import FaultProxy
from relayclient import RelayClient
from relayclient.http import HttpSession

logger = logging.getLogger(__name__)

BREAKS = ("dedup", "store-before-send")
FAULTS = ("drop", "halfopen", "offline", "kill", "redis", "pgkill", "retry")
PASSWORD = "chaos-pass-1"

# Read after the run inside the deployment: every stored message's token, and what is left
# in each client's queue (entries at or below the acked seq must never exist).
_REPORT_SQL = """
import json
from clients.models import Client
from messaging.models import Delivery, Message
stored = [
    {"id": pk, "token": (json.loads('{"id":0' + wire)["body"] or {}).get("token", "?")}
    for pk, wire in Message.objects.values_list("id", "wire")
]
queues = {}
for cid, acked in Client.objects.values_list("id", "acked_seq"):
    entries = Delivery.objects.filter(client_id=cid)
    queues[str(cid)] = {
        "acked_seq": acked,
        "acked_entries": entries.filter(seq__lte=acked).count(),
        "entries": entries.count(),
    }
print("CHAOS-DB " + json.dumps({"stored": stored, "queues": queues}))
"""


@dataclass
class Options:
    """
    The shape of a run; every choice at random is made from `seed`.
    """

    tabs: int = 200
    users: int = 40
    rooms: int = 8
    room_size: int = 5
    messages: int = 5000
    processes: int = 2
    seed: int = 1
    faults: tuple[str, ...] = FAULTS
    fault_every: int = 100
    rate: float = 250.0
    window: int = 200
    dm_share: float = 0.3
    settle: float = 120.0
    # Settled means no delivery arrived for this long (tabs ping every 2 s when idle).
    quiet: float = 6.0
    break_: str | None = None
    workdir: Path | None = None
    progress: bool = True


@dataclass
class Report:
    """
    What a run did and what the checks found.
    """

    options: dict
    operations: dict = field(default_factory=dict)
    faults: dict = field(default_factory=dict)
    violations: dict = field(default_factory=dict)
    seconds: float = 0.0
    server_errors: int = 0

    @property
    def ok(self) -> bool:
        """
        No violation of any kind.
        """
        return not self.violations

    def as_json(self) -> str:
        """
        One JSON line for machines (violations as counts).
        """
        return json.dumps(
            {
                "options": self.options,
                "operations": self.operations,
                "faults": self.faults,
                "violations": {k: len(v) for k, v in self.violations.items()},
                "seconds": round(self.seconds, 1),
                "server_errors_logged": self.server_errors,
                "ok": self.ok,
            },
            sort_keys=True,
        )


class ChaosRun:
    """
    Drives one run; `await ChaosRun(options).run()` returns its Report.
    """

    def __init__(self, options: Options) -> None:
        self.o = options
        self.rng = random.Random(options.seed)
        self.fault_counts: Counter = Counter()
        self.deployment: Deployment | None = None
        self.proxies: list[FaultProxy] = []
        self.tabs: list[RelayClient] = []
        self._fault_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._fault_tasks: list[asyncio.Task] = []
        self._start = time.monotonic()

    def say(self, text: str) -> None:
        if self.o.progress:
            print(f"[chaos {time.monotonic() - self._start:6.1f}s] {text}", flush=True)

    # -- set-up ---------------------------------------------------------------------------------

    def _plan(self) -> tuple[dict[str, str], dict[str, list[str]]]:
        users = {f"u{i:03d}": PASSWORD for i in range(self.o.users)}
        names = sorted(users)
        size = min(self.o.room_size, len(names))
        rooms = {f"room{i}": sorted(self.rng.sample(names, size)) for i in range(self.o.rooms)}
        return users, rooms

    async def _deploy(self, users: dict[str, str], rooms: dict[str, list[str]]) -> None:
        o = self.o
        postgres = bool(os.environ.get("DATABASE_URL"))
        if o.processes > 1 and not postgres:
            raise SystemExit("more than one process needs PostgreSQL: set DATABASE_URL")
        own_redis = o.processes > 1 or "redis" in o.faults
        workdir = o.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
        workdir.mkdir(parents=True, exist_ok=True)
        settings = {
            "MESSAGING_SEND_RATE": "None",
            "MESSAGING_USER_SEND_RATE": "None",
            # The checker does not model evictions (--tabs / --users may exceed the bound).
            "CLIENTS_MAX_PER_USER": "None",
            "CLIENTS_HEARTBEAT_INTERVAL": "1",
            "CLIENTS_PROCESS_TIMEOUT": "6",
            "CLIENTS_CLEANUP_INTERVAL": "3",
            "LOG_LEVEL": os.environ.get("CHAOS_SERVER_LOG_LEVEL", "WARNING"),
        }
        if o.break_:
            settings["CHAOS_BREAK"] = o.break_
        self.say(
            f"deploying {o.processes} daphne process(es) on "
            f"{'PostgreSQL' if postgres else 'SQLite'} + "
            f"{'a private redis-server' if own_redis else 'the in-memory layer'} in {workdir}"
        )
        dep = await asyncio.to_thread(Deployment, workdir, own_redis=own_redis, **settings)
        self.deployment = dep
        await asyncio.to_thread(dep.populate, users, rooms)
        for _ in range(o.processes):
            server = await asyncio.to_thread(dep.start, None, self.app)
            proxy = FaultProxy(server.port)
            await proxy.start()
            self.proxies.append(proxy)

    @property
    def app(self) -> str:
        return "chaos.broken:application" if self.o.break_ else "chatproject.asgi:application"

    async def _open_tabs(self, history: History, users: list[str]) -> None:
        dep = self.deployment
        assert dep is not None
        http_urls = [server.base_url for server in dep.servers]
        ws_urls = [f"ws://127.0.0.1:{proxy.port}" for proxy in self.proxies]
        for i in range(self.o.tabs):
            user = users[i % len(users)]
            tab = RelayClient(
                http_urls[i % len(http_urls)],
                user,
                PASSWORD,
                ack_delay=0.05,
                http_fallback_after=4.0,
                ping_interval=2.0,
                keepalive=2.5,
                backoff=(0.1, 2.0),
                alternates=http_urls[i % len(http_urls) :] + http_urls[: i % len(http_urls)],
                rng=random.Random(self.rng.random()),
            )
            tab.ws_urls = ws_urls
            tab.on_message = self._recorder(history, tab)
            tab.on_frame = self._frame_recorder(history)
            self.tabs.append(tab)
        # One login per user, shared by its tabs as a browser's tabs share the session cookie
        # (password hashing would otherwise dominate the start-up).
        sessions = {user: HttpSession(http_urls[0], alternates=http_urls) for user in users}
        await asyncio.gather(*(s.login(user, PASSWORD) for user, s in sessions.items()))
        for tab in self.tabs:
            for cookie in sessions[tab.username].jar:
                tab.http.jar.set_cookie(cookie)
        for batch in range(0, len(self.tabs), 20):
            await asyncio.gather(*(tab.start() for tab in self.tabs[batch : batch + 20]))
        for tab in self.tabs:
            assert tab.client_id
            history.client_user[tab.client_id] = tab.username
        self.initial_ids = [tab.client_id for tab in self.tabs]
        await self._until(lambda: all(t.status == "online" for t in self.tabs), 60, "tabs online")
        self.say(f"{len(self.tabs)} tabs of {len(users)} users online")

    @staticmethod
    def _recorder(history: History, tab: RelayClient):
        def record(seq: int, message: dict) -> None:
            assert tab.client_id is not None
            history.on_message(tab.client_id, seq, message)

        return record

    @staticmethod
    def _frame_recorder(history: History):
        def record(frame: dict) -> None:
            if frame.get("type") == "sent" and frame.get("client_msg_id") in history.sends:
                history.answered(frame["client_msg_id"], frame)

        return record

    # -- load and faults ------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _schedule(self) -> dict[int, str]:
        kinds = list(self.o.faults)
        if not kinds or self.o.fault_every <= 0:
            return {}
        # Every kind once, in a shuffled order, then at random: short runs still see each one.
        order = self.rng.sample(kinds, len(kinds))
        at = range(self.o.fault_every, self.o.messages, self.o.fault_every)
        return {
            n: (order[i] if i < len(order) else self.rng.choice(kinds)) for i, n in enumerate(at)
        }

    async def _load(self, history: History, rooms: dict[str, list[str]]) -> None:
        o = self.o
        schedule = self._schedule()
        user_rooms: dict[str, list[str]] = {}
        for room, members in rooms.items():
            for user in members:
                user_rooms.setdefault(user, []).append(room)
        usernames = sorted({tab.username for tab in self.tabs})
        window = asyncio.Semaphore(o.window)
        for n in range(o.messages):
            if n in schedule:
                self._fault_tasks.append(asyncio.create_task(self._fault(schedule[n], history)))
            tab = self.rng.choice(self.tabs)
            mine = user_rooms.get(tab.username)
            if mine and self.rng.random() >= o.dm_share:
                to = {"room": self.rng.choice(mine)}
            else:
                to = {"user": self.rng.choice([u for u in usernames if u != tab.username])}
            token = f"s{o.seed}-m{n}"
            assert tab.client_id is not None
            history.sending(token, tab.username, tab.client_id, to)
            await window.acquire()
            await tab.send(to, {"token": token, "n": n}, client_msg_id=token)
            self._spawn(self._confirm(history, tab, token, window))
            await asyncio.sleep(1 / o.rate)

    async def _report_progress(self, history: History) -> None:
        while True:
            await asyncio.sleep(10)
            confirmed = sum(1 for r in history.sends.values() if r.ids)
            self.say(
                f"{len(history.sends)} sent, {confirmed} confirmed, "
                f"{sum(len(t.state['outbox']) for t in self.tabs)} in outboxes, "
                f"{sum(t.status == 'online' for t in self.tabs)}/{len(self.tabs)} tabs online, "
                f"{sum(len(v) for v in history.processed.values())} deliveries processed, "
                f"{sum(self.fault_counts.values())} faults"
            )

    async def _confirm(self, history: History, tab: RelayClient, token: str, window) -> None:
        try:
            history.answered(token, await tab.wait_sent(token, timeout=self.o.settle + 60))
        except Exception as exc:
            logger.debug("send %s not confirmed: %r", token, exc)
        finally:
            window.release()

    async def _fault(self, kind: str, history: History) -> None:
        dep = self.deployment
        assert dep is not None
        async with self._fault_lock:
            self.fault_counts[kind] += 1
            if kind == "drop":
                count = sum(
                    p.cut(self.rng.randint(1, max(1, len(self.tabs) // 10)), self.rng)
                    for p in self.proxies
                )
                self.say(f"fault: cut {count} connections")
            elif kind == "offline":
                # Tabs with no network at all for a few seconds (a train tunnel, a sleeping
                # laptop): no socket, no HTTP; then they come back with the state they had.
                seconds = self.rng.uniform(1, 4)
                chosen = self.rng.sample(
                    self.tabs, self.rng.randint(1, max(1, len(self.tabs) // 10))
                )
                self.say(f"fault: {len(chosen)} tabs offline for {seconds:.1f}s")
                await asyncio.gather(*(tab.stop() for tab in chosen))
                await asyncio.sleep(seconds)
                await asyncio.gather(*(tab.start() for tab in chosen))
            elif kind == "halfopen":
                seconds = self.rng.uniform(3, 8)
                count = sum(
                    p.freeze(self.rng.randint(1, max(1, len(self.tabs) // 20)), self.rng, seconds)
                    for p in self.proxies
                )
                self.say(f"fault: {count} connections half-open for {seconds:.1f}s")
            elif kind == "kill":
                index = self.rng.randrange(len(dep.servers))
                server: Server = dep.servers[index]
                down = self.rng.uniform(0.3, 2.0)
                self.say(f"fault: SIGKILL daphne :{server.port}, restart in {down:.1f}s")
                server.kill()
                await asyncio.sleep(down)
                await asyncio.to_thread(dep.restart, server, self.app)
            elif kind == "redis":
                if dep.redis is None:
                    self.fault_counts[kind] -= 1
                    return
                down = self.rng.uniform(0.2, 1.5)
                self.say(f"fault: redis-server SIGKILL, restart in {down:.1f}s")
                await asyncio.to_thread(dep.redis.restart, down)
            elif kind == "pgkill":
                killed = await asyncio.to_thread(dep.kill_database_connections)
                self.say(f"fault: terminated {killed} PostgreSQL connections")
            elif kind == "retry":
                await self._retry_some(history)
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))

    async def _retry_some(self, history: History) -> None:
        # Legitimate client behaviour a flaky network forces: a stored send sent once more, with
        # the same client_msg_id, over the socket or over HTTP. Must store nothing new.
        done = [r for r in history.sends.values() if r.ids]
        chosen = self.rng.sample(done, min(10, len(done)))
        by_id = {tab.client_id: tab for tab in self.tabs}
        for record in chosen:
            tab = by_id.get(record.client_id)
            if tab is None:
                continue
            payload = {
                "client_msg_id": record.token,
                "to": record.to,
                "body": {"token": record.token, "n": int(record.token.rsplit("m", 1)[1])},
            }
            if tab.ws is not None and self.rng.random() < 0.5:
                with contextlib.suppress(Exception):
                    await tab.ws.send(json.dumps({"type": "send", **payload}))
            else:
                with contextlib.suppress(OSError):
                    status, body = await tab.http.request(
                        "POST", "/api/messages/", {"client_id": tab.client_id, **payload}
                    )
                    if status in (200, 201):
                        history.answered(record.token, body)
        self.say(f"fault: retried {len(chosen)} stored sends")

    # -- settle and check -----------------------------------------------------------------------

    async def _until(self, predicate, timeout: float, what: str) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.say(f"gave up waiting for: {what}")
                return False
            await asyncio.sleep(0.25)
        return True

    async def _settle(self, history: History, began: float) -> dict:
        self.say("load done; settling")
        if self._fault_tasks:
            await asyncio.wait(self._fault_tasks, timeout=self.o.settle)
        await self._until(
            lambda: all(not t.state["outbox"] for t in self.tabs), self.o.settle, "outboxes empty"
        )
        confirmed_after = time.monotonic() - began
        await self._until(
            lambda: all(t.status == "online" for t in self.tabs), self.o.settle, "tabs online"
        )
        # Deliveries still in flight drain, and the tabs find out about anything they missed by
        # their own pings (every 2 s when idle): wait until nothing has arrived for a while.
        deadline = time.monotonic() + self.o.settle
        last, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - quiet_since < self.o.quiet:
            total = sum(len(v) for v in history.processed.values())
            if total != last:
                last, quiet_since = total, time.monotonic()
            await asyncio.sleep(0.5)
        recovered = sum(await asyncio.gather(*(tab.sync() for tab in self.tabs)))
        await asyncio.sleep(0.5)
        return {
            "caught_up_by_final_sync": recovered,
            "sends_per_second": round(len(history.sends) / confirmed_after, 1),
        }

    async def run(self) -> Report:
        """
        Deploy, load with faults, settle, check; always tears the deployment down.
        """
        o = self.o
        opts = {k: v for k, v in vars(o).items() if k not in ("workdir", "progress")}
        opts["faults"] = list(o.faults)
        report = Report(options=opts)
        users, rooms = self._plan()
        history = History(members={room: set(m) for room, m in rooms.items()})
        try:
            await self._deploy(users, rooms)
            await self._open_tabs(history, sorted(users))
            if o.progress:
                self._spawn(self._report_progress(history))
            began = time.monotonic()
            await self._load(history, rooms)
            extra = await self._settle(history, began)
            for tab, first in zip(self.tabs, self.initial_ids, strict=True):
                if tab.client_id != first:
                    history.identities_lost.append(str(first))
            stats: Counter = Counter()
            for tab in self.tabs:
                stats.update(tab.stats)
            await asyncio.gather(*(tab.stop() for tab in self.tabs))
            db = await asyncio.to_thread(self._read_database)
            report.violations = history.check(db["stored"], db["queues"])
            report.operations = {
                "sends": len(history.sends),
                "confirmed": sum(1 for r in history.sends.values() if r.ids),
                "duplicate_answers": sum(r.duplicates for r in history.sends.values()),
                "stored_messages": len(db["stored"]),
                "deliveries_processed": sum(len(v) for v in history.processed.values()),
                "reconnects": stats["connects"] - len(self.tabs),
                "resyncs": stats["resyncs"],
                "http_sends": stats["http_sends"],
                "send_retries": stats["send_retries"],
                **extra,
            }
            report.faults = dict(self.fault_counts)
            report.server_errors = self._server_errors()
        finally:
            for task in [*self._tasks, *self._fault_tasks]:
                task.cancel()
            for proxy in self.proxies:
                await proxy.stop()
            for tab in self.tabs:
                with contextlib.suppress(Exception):
                    await tab.stop()
            if self.deployment is not None:
                await asyncio.to_thread(self.deployment.close)
            report.seconds = time.monotonic() - self._start
        return report

    def _read_database(self) -> dict:
        assert self.deployment is not None
        out = self.deployment.manage("shell", "-c", _REPORT_SQL)
        line = next(x for x in out.splitlines() if x.startswith("CHAOS-DB "))
        return json.loads(line[len("CHAOS-DB ") :])

    def _server_errors(self) -> int:
        assert self.deployment is not None
        logs = self.deployment.workdir.glob("daphne-*.log")
        return sum(path.read_text(errors="replace").count("Traceback") for path in logs)
