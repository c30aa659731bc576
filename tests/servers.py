"""
Real servers for tests: a deployment (its own database and channel-layer prefix) served by one or
more real daphne processes on free loopback ports, always stopped afterwards.

On the defaults it uses a fresh SQLite file and the in-memory layer; with DATABASE_URL and
REDIS_URL set it creates a fresh PostgreSQL database and a fresh Redis prefix, and drops them.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from relayclient.http import HttpSession

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_admin(url: str, sql: str) -> None:
    import psycopg

    parts = urlsplit(url)
    admin = urlunsplit(parts._replace(path="/postgres", query=""))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql)


class Server:
    """
    One daphne process.
    """

    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.base_url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daphne exited: {self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"daphne did not listen on {self.port}: {self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Deployment:
    """
    A database and layer prefix, migrated, that real daphne processes share.
    """

    def __init__(self, workdir: Path, **settings: str) -> None:
        self.workdir = workdir
        self.servers: list[Server] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
        self.env.update({"DJANGO_DEBUG": "0", "LOG_LEVEL": "INFO", **settings})
        self.env.pop("DJANGO_SETTINGS_MODULE", None)
        self._pg_db = None
        base = os.environ.get("DATABASE_URL")
        if base:
            self._pg_url = base
            self._pg_db = f"tabrelay_srv_{uuid.uuid4().hex[:12]}"
            _pg_admin(base, f'CREATE DATABASE "{self._pg_db}"')
            parts = urlsplit(base)
            self.env["DATABASE_URL"] = urlunsplit(parts._replace(path=f"/{self._pg_db}"))
        else:
            self.env["SQLITE_PATH"] = str(workdir / "db.sqlite3")
        if os.environ.get("REDIS_URL"):
            self.env["REDIS_PREFIX"] = f"srv-{uuid.uuid4().hex[:12]}"
        self.manage("migrate", "--noinput", "-v", "0")

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def create_user(self, username: str, password: str) -> None:
        self.manage(
            "shell",
            "-c",
            (
                "from django.contrib.auth import get_user_model as g; "
                f"g().objects.create_user({username!r}, password={password!r})"
            ),
        )

    def create_room(self, name: str, members: list[str]) -> None:
        self.manage(
            "shell",
            "-c",
            (
                "from messaging.models import Room; "
                "from django.contrib.auth import get_user_model as g; "
                f"r = Room.objects.create(name={name!r}); "
                f"r.members.add(*g().objects.filter(username__in={members!r}))"
            ),
        )

    def start(self, port: int | None = None) -> Server:
        port = port or free_port()
        log = self.workdir / f"daphne-{port}-{len(self.servers)}.log"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "chatproject.asgi:application",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        server = Server(proc, port, log)
        self.servers.append(server)
        server.wait_ready()
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        if self._pg_db:
            _pg_admin(self._pg_url, f'DROP DATABASE IF EXISTS "{self._pg_db}" WITH (FORCE)')
        if self.env.get("REDIS_PREFIX"):
            import redis

            conn = redis.Redis.from_url(os.environ["REDIS_URL"])
            keys = list(conn.scan_iter(f"{self.env['REDIS_PREFIX']}*"))
            if keys:
                conn.delete(*keys)


class Session(HttpSession):
    """
    A logged-in browser-like HTTP session against a real server (the client library's own
    session, with blocking calls for tests).
    """

    request = HttpSession.request_sync  # type: ignore[assignment]
    login = HttpSession.login_sync  # type: ignore[assignment]

    def ws_headers(self) -> dict[str, str]:
        return {"Cookie": self.cookie_header(), "Origin": self.base_url}
