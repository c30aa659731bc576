"""
Shared fixtures: users, logged-in HTTP clients, and WebSocket tabs through the real ASGI app.

The same suite runs against the defaults (on-disk SQLite, in-memory layer) and, with
DATABASE_URL / REDIS_URL set, against real PostgreSQL and Redis servers.
"""

import json
import uuid

import pytest
from channels import DEFAULT_CHANNEL_LAYER
from channels.db import database_sync_to_async
from channels.layers import channel_layers, get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.db import connections
from django.test import Client as HttpClient

from chatproject.asgi import application
from messaging.services import send_rate

pytest_plugins = ["tests.hangs"]

# In-process tests close the database connection after every call: a connection kept by a
# thread of channels' executor would block dropping the test database.
django_settings.DATABASES["default"]["CONN_MAX_AGE"] = 0
# Nor a pool (for the same reason); the real daphne processes of tests/servers.py use one.
django_settings.DATABASES["default"].get("OPTIONS", {}).pop("pool", None)
# Users made by the in-process tests get a fast hash (PBKDF2's was most of each test's setup);
# the real daphne processes of tests/servers.py keep the real hashers for the users they make.
django_settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

ORIGIN = b"http://localhost"
HOST = (b"host", b"localhost")  # what a browser on ORIGIN sends: the Origin check compares both
TIMEOUT = 5


@pytest.fixture(scope="session", autouse=True)
def _test_database_free_to_drop(django_db_setup, django_db_blocker):
    """
    On PostgreSQL, threads of the suite (the connection pool, database threads of consumers)
    can keep a connection to the test database open at the end; dropping it would then fail
    ("being accessed by other users") and leave it behind. Those sessions are ended first.
    """
    yield
    with django_db_blocker.unblock():
        conn = connections["default"]
        if conn.vendor != "postgresql":
            return
        name = conn.settings_dict["NAME"]
        close_pool = getattr(conn, "close_pool", None)
        if close_pool is not None:
            close_pool()
        conn.close()
        with conn._nodb_cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )


@pytest.fixture(autouse=True)
def _no_periodic_tasks_in_the_test_loop(settings):
    # In-process tests drive cleanup explicitly; real daphne processes (tests/servers.py) run it.
    settings.CLIENTS_RUN_PERIODIC = False


@pytest.fixture(autouse=True)
def _reset_rate_limits():
    send_rate.reset()
    yield
    send_rate.reset()


@pytest.fixture(autouse=True)
async def _flush_channel_layer():
    yield
    layer = get_channel_layer()
    if hasattr(layer, "flush"):
        await layer.flush()
    if hasattr(layer, "close_pools"):
        await layer.close_pools()
    # Each test runs in its own event loop; a layer's asyncio locks must not outlive it.
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)


def make_user(username: str):
    return get_user_model().objects.create_user(username=username, password="pw-" + username)


@pytest.fixture
def alice(db):
    return make_user("alice")


@pytest.fixture
def bob(db):
    return make_user("bob")


@pytest.fixture
def carol(db):
    return make_user("carol")


def http_as(user, *, csrf: bool = False) -> HttpClient:
    """
    A Django test client logged in as `user` (CSRF enforced when `csrf`).
    """
    client = HttpClient(enforce_csrf_checks=csrf)
    if user is not None:
        client.force_login(user)
    return client


def api_post(client: HttpClient, path: str, payload=None, **extra):
    data = "" if payload is None else json.dumps(payload)
    return client.post(path, data=data, content_type="application/json", **extra)


def register(client: HttpClient) -> str:
    response = api_post(client, "/api/clients/")
    assert response.status_code == 201, response.content
    return response.json()["client_id"]


def session_cookie(user) -> str:
    client = HttpClient()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


class Tab:
    """
    A WebSocket connection of one client, as a browser tab would hold it.
    """

    def __init__(self, communicator: WebsocketCommunicator, client_id: str) -> None:
        self.comm = communicator
        self.client_id = client_id
        self.hello: dict | None = None
        self.skipped: list[dict] = []

    async def recv(self, timeout: float = TIMEOUT) -> dict:
        return await self.comm.receive_json_from(timeout=timeout)

    async def send(self, payload) -> None:
        await self.comm.send_json_to(payload)

    async def send_text(self, text: str) -> None:
        await self.comm.send_to(text_data=text)

    async def nothing(self, timeout: float = 0.3) -> bool:
        return await self.comm.receive_nothing(timeout=timeout)

    async def recv_type(self, kind: str, timeout: float = TIMEOUT) -> dict:
        """
        Receive frames until one of type `kind` (other frames are kept in `self.skipped`).
        """
        while True:
            frame = await self.recv(timeout)
            if frame["type"] == kind:
                return frame
            self.skipped.append(frame)

    async def deliveries(self, count: int, timeout: float = TIMEOUT) -> list[dict]:
        # Deliveries that recv_type skipped come first: a sender's own delivery of a message may
        # come before or after its `sent` frame (the protocol does not fix that order).
        frames = [f for f in self.skipped if f["type"] == "delivery"][:count]
        for frame in frames:
            self.skipped.remove(frame)
        while len(frames) < count:
            frame = await self.recv(timeout)
            if frame["type"] == "delivery":
                frames.append(frame)
        return frames

    async def close_code(self, timeout: float = TIMEOUT) -> int | None:
        while True:
            output = await self.comm.receive_output(timeout)
            if output["type"] == "websocket.close":
                return output.get("code")

    async def disconnect(self) -> None:
        await self.comm.disconnect()


async def open_ws(user, query: str, *, origin: bytes | None = ORIGIN) -> WebsocketCommunicator:
    headers = [HOST]
    if origin is not None:
        headers.append((b"origin", origin))
    if user is not None:
        cookie = await database_sync_to_async(session_cookie)(user)
        headers.append((b"cookie", cookie.encode()))
    communicator = WebsocketCommunicator(application, f"/ws/?{query}", headers=headers)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    return communicator


async def connect_tab(user, client_id: str, after: int = 0, query: str = "") -> Tab:
    """
    Open a socket for `client_id` (with more `query` parameters, if any) and read its hello.
    """
    extra = f"&{query}" if query else ""
    tab = Tab(await open_ws(user, f"client_id={client_id}&after={after}{extra}"), client_id)
    tab.hello = await tab.recv()
    assert tab.hello["type"] == "hello", tab.hello
    return tab


async def refused_with(user, query: str, origin: bytes | None = ORIGIN) -> int | None:
    """
    Open a socket that the server is expected to refuse; return its close code.
    """
    communicator = await open_ws(user, query, origin=origin)
    output = await communicator.receive_output(TIMEOUT)
    await communicator.disconnect()
    assert output["type"] == "websocket.close", output
    return output.get("code")


@database_sync_to_async
def new_client(user) -> str:
    """
    Register a client over HTTP (as a tab does on first load) and return its id.
    """
    return register(http_as(user))


def random_id() -> str:
    return str(uuid.uuid4())
