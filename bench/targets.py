"""
The servers under test, started on 127.0.0.1 for one workload and stopped after it.

- `Ours`: a fresh deployment (harness.Deployment) served by real daphne processes. Workloads
  1-4 run on the project's one-machine defaults (SQLite + the in-memory channel layer), as the
  peer runs on SQLite; the scale workload runs on PostgreSQL + channels-redis (a private
  redis-server). The per-client send rate limit is off (MESSAGING_SEND_RATE=None).
- `Peer`: the Socket.IO tutorial server (bench/peers/socketio/server.js) with a fresh SQLite file.
"""

import asyncio
import os
import signal
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from bench.common import pids_matching, wait_until

PASSWORD = "bench-pass-1"
ROOM = "bench"

# Users in one go with one password hash for all of them (PBKDF2 costs ~1 s per hash here).
_POPULATE = """
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from messaging.models import Room
User = get_user_model()
names = {names!r}
digest = make_password({password!r})
User.objects.bulk_create([User(username=n, password=digest) for n in names])
Room.objects.create(name={room!r}).members.add(*User.objects.filter(username__in=names))
"""


class _Env:
    """
    Set or remove environment variables for the duration of a block (Deployment reads
    DATABASE_URL / REDIS_URL from the environment when it is created).
    """

    def __init__(self, **values: str | None) -> None:
        self.values = values
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for key, value in self.values.items():
            self.saved[key] = os.environ.get(key)
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Ours:
    """
    A deployment of this project: `processes` daphne processes; users u0..u{n-1}, all members
    of one room, each logged in once (its cookies are shared by its tabs).
    """

    kind = "ours"
    label = "ours (daphne)"

    def __init__(
        self,
        workdir: Path,
        users: int,
        *,
        processes: int = 1,
        database_url: str | None = None,
        settings: dict[str, str] | None = None,
        ack_delay: float = 0.2,
    ) -> None:
        self.ack_delay = ack_delay
        self.workdir = workdir
        self.user_names = [f"u{i}" for i in range(max(1, users))]
        self.processes = processes
        self.database_url = database_url
        self.settings = {
            "MESSAGING_SEND_RATE": "None",
            "MESSAGING_USER_SEND_RATE": "None",
            # Hundreds of tabs share a few logins here.
            "CLIENTS_MAX_PER_USER": "None",
            "LOG_LEVEL": "WARNING",
            **(settings or {}),
        }
        self.deployment = None
        self.cookies: dict[str, list] = {}
        self.hung_on_sigterm = 0

    @property
    def backend(self) -> str:
        if self.database_url:
            return "PostgreSQL + channels-redis"
        return "SQLite + in-memory layer"

    async def start(self) -> None:
        from harness.deployment import Deployment

        def deploy() -> Deployment:
            if self.database_url:
                with _Env(DATABASE_URL=self.database_url, REDIS_URL=None):
                    return Deployment(self.workdir, own_redis=True, **self.settings)
            with _Env(DATABASE_URL=None, REDIS_URL=None):
                return Deployment(self.workdir, **self.settings)

        self.deployment = await asyncio.to_thread(deploy)
        script = _POPULATE.format(names=self.user_names, password=PASSWORD, room=ROOM)
        await asyncio.to_thread(self.deployment.manage, "shell", "-c", script)
        for _ in range(self.processes):
            await asyncio.to_thread(self.deployment.start)
        await self._login()

    async def _login(self) -> None:
        from relayclient.http import HttpSession

        async def login(name: str) -> None:
            session = HttpSession(self.urls[0])
            await session.login(name, PASSWORD)
            self.cookies[name] = list(session.jar)

        await asyncio.gather(*(login(name) for name in self.user_names))

    @property
    def urls(self) -> list[str]:
        assert self.deployment is not None
        return [server.base_url for server in self.deployment.servers]

    @property
    def pids(self) -> list[int]:
        assert self.deployment is not None
        return [server.proc.pid for server in self.deployment.servers]

    def aux_pids(self) -> list[int] | None:
        """
        With PostgreSQL + Redis: the private redis-server and this database's backends.
        """
        if self.deployment is None or not self.deployment.database_url:
            return []
        name = urlsplit(self.deployment.database_url).path.lstrip("/")
        pids = pids_matching(f" {name} ")
        if self.deployment.redis is not None and self.deployment.redis.proc is not None:
            pids.append(self.deployment.redis.proc.pid)
        return pids

    def health(self) -> dict:
        """
        Whether each daphne process is alive and still accepts connections.
        """
        out = {"alive": [], "accepting": []}
        for server in self.deployment.servers if self.deployment else []:
            out["alive"].append(server.alive)
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=2):
                    out["accepting"].append(True)
            except OSError:
                out["accepting"].append(False)
        return out

    def tab_spec(self, i: int) -> dict:
        """
        Tab i: user i mod users, on server i mod processes.
        """
        user = self.user_names[i % len(self.user_names)]
        return {
            "kind": "ours",
            "url": self.urls[i % len(self.urls)],
            "user": user,
            "password": PASSWORD,
            "cookies": self.cookies[user],
            "room": ROOM,
            "ack_delay": self.ack_delay,
        }

    def idle_args(self) -> dict:
        url = self.urls[0]
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        return {
            "kind": "ours",
            "host": host,
            "port": int(port),
            "users": [{"cookies": self.cookies[name]} for name in self.user_names],
        }

    def server_errors(self) -> int:
        """
        Tracebacks in the daphne logs.
        """
        return sum(
            path.read_text(errors="replace").count("Traceback")
            for path in self.workdir.glob("daphne-*.log")
        )

    async def close(self) -> None:
        if self.deployment is None:
            return
        # SIGTERM, and SIGKILL after a few seconds: a daphne process stopped while it is still
        # detaching sockets can hang in its shutdown (threads in async_to_sync waiting for the
        # stopped event loop), and Deployment.close would wait 10 s for each.
        servers = list(self.deployment.servers)
        for server in servers:
            if server.alive:
                server.proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: not any(s.alive for s in servers), 3, step=0.05)
        self.hung_on_sigterm = sum(1 for s in servers if s.alive)
        for server in servers:
            if server.alive:
                server.kill()
        await asyncio.to_thread(self.deployment.close)
        self.deployment = None


class Peer:
    """
    The Socket.IO tutorial server (one node process, SQLite, everybody in one room).
    """

    kind = "peer"
    label = "peer (socket.io)"
    backend = "SQLite (node sqlite3)"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.handle = None

    async def start(self) -> None:
        from bench.peers.socketio.client import start_server

        self.handle = await start_server(self.workdir, 0)

    @property
    def urls(self) -> list[str]:
        assert self.handle is not None
        return [self.handle.url]

    @property
    def pids(self) -> list[int]:
        assert self.handle is not None
        return [self.handle.pid]

    def tab_spec(self, i: int) -> dict:
        return {"kind": "peer", "url": self.urls[0]}

    def idle_args(self) -> dict:
        assert self.handle is not None
        return {"kind": "peer", "host": "127.0.0.1", "port": self.handle.port}

    def server_errors(self) -> int:
        return 0

    async def close(self) -> None:
        if self.handle is not None:
            await self.handle.stop()
            self.handle = None


def peer_available() -> str | None:
    """
    None if the peer can run here, else why not.
    """
    import shutil

    here = Path(__file__).resolve().parent / "peers" / "socketio"
    if not (os.environ.get("NODE") or shutil.which("node")):
        return "node is not installed"
    if not (here / "node_modules" / "socket.io").is_dir():
        return f"node modules missing: run {here / 'setup'}"
    try:
        import socketio  # noqa: F401
    except ImportError:
        return (
            "python-socketio is not installed: "
            "pip install 'python-socketio[asyncio_client]>=5.18,<6'"
        )
    return None


def new_workdir(base: Path | None, name: str) -> Path:
    """
    A fresh directory for one server's files.
    """
    if base is None:
        return Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
    return path
