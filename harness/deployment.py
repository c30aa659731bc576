"""
Real servers: a deployment (its own database and channel-layer prefix) served by one or more real
daphne processes on free loopback ports, always stopped afterwards.

On the defaults it uses a fresh SQLite file and the in-memory layer; with DATABASE_URL and
REDIS_URL set it creates a fresh PostgreSQL database and a fresh Redis prefix, and drops them.
With `own_redis=True` it starts a private redis-server instead, which the chaos tool restarts.
"""

import contextlib
import hashlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_admin(url: str, sql: str, *params: object) -> list:
    import psycopg

    parts = urlsplit(url)
    admin = urlunsplit(parts._replace(path="/postgres", query=""))
    with psycopg.connect(admin, autocommit=True) as conn:
        cursor = conn.execute(sql, params or None)
        return cursor.fetchall() if cursor.description else []


FAST_HASHER = "django.contrib.auth.hashers.MD5PasswordHasher"


def ensure_secret_key() -> str:
    """
    DJANGO_SECRET_KEY of this process, made up (random) when unset: the settings refuse to start
    without one, and a throwaway deployment needs no fixed key.
    """
    return os.environ.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))


def _migrations_key() -> str:
    """
    A digest of every migration file and the Django version: the name of a migrated template.
    """
    import django

    from chatproject import settings

    digest = hashlib.sha1(django.get_version().encode())
    paths = sorted(ROOT.glob("*/migrations/*.py"))
    # Installed third-party apps' migrations too (django-axes's tables).
    for app in settings.INSTALLED_APPS:
        spec = importlib.util.find_spec(app)
        for location in (spec.submodule_search_locations or []) if spec else []:
            if Path(location).resolve().parent != ROOT:  # not one of ours, globbed above
                paths.extend(sorted(Path(location).glob("migrations/*.py")))
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _sqlite_copy(source: Path, target: Path) -> None:
    # The backup API: a consistent copy, WAL included.
    with contextlib.closing(sqlite3.connect(source)) as src:
        with contextlib.closing(sqlite3.connect(target)) as dst:
            src.backup(dst)


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name}: the process exited: {log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}: {log.read_text()[-3000:]}")


class RedisServer:
    """
    A private redis-server on a free loopback port (no persistence), restartable on that port.
    """

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = workdir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """
        Start (again) on the same port.
        """
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
        )
        _wait_port(self.port, self.proc, self.log)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """
        Stop it (by default as a crash would: SIGKILL, everything in it lost).
        """
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)

    def restart(self, down_for: float = 0.0) -> None:
        """
        A crash and a restart: every key, group membership and queued message is gone.
        """
        self.stop()
        time.sleep(down_for)
        self.start()


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
        """
        Wait until it listens; raise with the end of its log if it exits or does not listen.
        """
        _wait_port(self.port, self.proc, self.log, timeout)

    @property
    def alive(self) -> bool:
        """
        Whether the process is still running.
        """
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """
        Stop it with `sig` (SIGKILL after 10 s).
        """
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def kill(self) -> None:
        """
        SIGKILL, as a crash or an OOM kill would.
        """
        self.stop(signal.SIGKILL)


class Deployment:
    """
    A database and layer prefix, migrated, that real daphne processes share.
    """

    def __init__(self, workdir: Path, *, own_redis: bool = False, **settings: str) -> None:
        self.workdir = workdir
        self.redis: RedisServer | None = None
        self.servers: list[Server] = []
        ensure_secret_key()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
        self.env.update({"DJANGO_DEBUG": "0", "LOG_LEVEL": "INFO", **settings})
        # Throwaway users: PBKDF2 would cost each login and each created user half a second.
        self.env.setdefault("PASSWORD_HASHERS", FAST_HASHER)
        self.env.pop("DJANGO_SETTINGS_MODULE", None)
        self._pg_db = None
        base = os.environ.get("DATABASE_URL")
        if base:
            self._pg_url = base
            self._pg_db = f"tabrelay_srv_{uuid.uuid4().hex[:12]}"
            parts = urlsplit(base)
            self.env["DATABASE_URL"] = urlunsplit(parts._replace(path=f"/{self._pg_db}"))
        else:
            self.env["SQLITE_PATH"] = str(workdir / "db.sqlite3")
        if own_redis:
            self.redis = RedisServer(workdir)
            self.env["REDIS_URL"] = self.redis.url
        elif os.environ.get("REDIS_URL"):
            self.env["REDIS_PREFIX"] = f"srv-{uuid.uuid4().hex[:12]}"
        self._migrate()

    def _migrate(self) -> None:
        # Migrating costs a Django start-up and every migration, for every deployment: do it once
        # per set of migrations, into a template that each deployment copies.
        key = _migrations_key()
        if self._pg_db:
            template = f"tabrelay_tpl_{key}"
            exists = "SELECT 1 FROM pg_database WHERE datname = %s"
            if not _pg_admin(self._pg_url, exists, template):
                fresh = f"tabrelay_tplnew_{uuid.uuid4().hex[:12]}"
                _pg_admin(self._pg_url, f'CREATE DATABASE "{fresh}"')
                parts = urlsplit(self._pg_url)
                url = urlunsplit(parts._replace(path=f"/{fresh}"))
                try:
                    self.manage("migrate", "--noinput", "-v", "0", env={"DATABASE_URL": url})
                    _pg_admin(self._pg_url, f'ALTER DATABASE "{fresh}" RENAME TO "{template}"')
                except Exception:
                    _pg_admin(self._pg_url, f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')
                    if not _pg_admin(self._pg_url, exists, template):
                        raise  # not just another run that made the template first
            _pg_admin(self._pg_url, f'CREATE DATABASE "{self._pg_db}" TEMPLATE "{template}"')
            return
        template_path = Path(tempfile.gettempdir()) / f"tabrelay-template-{key}.sqlite3"
        target = Path(self.env["SQLITE_PATH"])
        if not template_path.exists():
            self.manage("migrate", "--noinput", "-v", "0")
            partial = template_path.with_suffix(f".{uuid.uuid4().hex[:8]}.part")
            _sqlite_copy(target, partial)
            os.replace(partial, template_path)
        else:
            _sqlite_copy(template_path, target)

    def manage(self, *args: str, env: dict[str, str] | None = None) -> str:
        """
        Run a management command against this deployment (with `env` on top); its stdout.
        """
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def populate(self, users: dict[str, str], rooms: dict[str, list[str]]) -> None:
        """
        Create users (name: password) and rooms (name: member names) in one go.
        """
        self.manage(
            "shell",
            "-c",
            (
                "from django.contrib.auth import get_user_model as g\n"
                "from messaging.models import Room\n"
                f"users = {users!r}\n"
                f"rooms = {rooms!r}\n"
                "for name, pw in users.items(): g().objects.create_user(name, password=pw)\n"
                "for name, members in rooms.items():\n"
                "    Room.objects.create(name=name).members.add("
                "*g().objects.filter(username__in=members))\n"
            ),
        )

    def create_user(self, username: str, password: str) -> None:
        """
        Create one user.
        """
        self.manage(
            "shell",
            "-c",
            (
                "from django.contrib.auth import get_user_model as g; "
                f"g().objects.create_user({username!r}, password={password!r})"
            ),
        )

    def create_room(self, name: str, members: list[str]) -> None:
        """
        Create a room with these members.
        """
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

    @property
    def database_url(self) -> str | None:
        """
        The PostgreSQL URL of this deployment's database (None on SQLite).
        """
        return self.env.get("DATABASE_URL") if self._pg_db else None

    def kill_database_connections(self) -> int:
        """
        Terminate every PostgreSQL backend serving this deployment; returns how many.
        """
        if not self._pg_db:
            return 0
        rows = _pg_admin(
            self._pg_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            self._pg_db,
        )
        return sum(1 for (done,) in rows if done)

    def start(
        self,
        port: int | None = None,
        app: str = "chatproject.asgi:application",
        daphne_args: tuple[str, ...] = (),
    ) -> Server:
        """
        Start one daphne process serving `app` (on `port`, or a free one, with `daphne_args`)
        and wait until it listens.
        """
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
                *daphne_args,
                app,
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

    def restart(self, server: Server, app: str = "chatproject.asgi:application") -> Server:
        """
        Start a new process on a dead (or stopped) server's port, in its place.
        """
        server.stop()
        fresh = self.start(server.port, app)
        self.servers.remove(fresh)
        self.servers[self.servers.index(server)] = fresh
        return fresh

    def close(self) -> None:
        """
        Stop every process and drop what this deployment created.
        """
        for server in self.servers:
            server.stop()
        if self.redis is not None:
            self.redis.stop()
        if self._pg_db:
            _pg_admin(self._pg_url, f'DROP DATABASE IF EXISTS "{self._pg_db}" WITH (FORCE)')
        if self.env.get("REDIS_PREFIX") and self.redis is None:
            import redis

            conn = redis.Redis.from_url(os.environ["REDIS_URL"])
            keys = list(conn.scan_iter(f"{self.env['REDIS_PREFIX']}*"))
            if keys:
                conn.delete(*keys)
