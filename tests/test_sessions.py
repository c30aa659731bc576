"""
An open socket follows its login: logout, a password change, deactivation and deletion close it
with 4401, at once through the channel layer and, when that event is lost, at the next re-check.
"""

import asyncio
import json
import os

import pytest
import websockets
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session as SessionRow
from django.test import Client as HttpClient

from chatproject.asgi import application
from clients import sessions as client_sessions
from clients.checks import check_settings
from tests.conftest import HOST, ORIGIN, TIMEOUT, Tab, make_user, new_client
from tests.servers import Deployment, Session

pytestmark = pytest.mark.django_db(transaction=True)

# Well below the re-check interval: these closes come from the channel layer's event.
AT_ONCE = 2.0


def logged_in(user) -> HttpClient:
    http = HttpClient()
    http.force_login(user)
    return http


async def tab_of(http: HttpClient, client_id: str) -> Tab:
    """A socket opened with the session of `http`, its hello read."""
    cookie = f"sessionid={http.cookies['sessionid'].value}".encode()
    headers = [HOST, (b"origin", ORIGIN), (b"cookie", cookie)]
    comm = WebsocketCommunicator(application, f"/ws/?client_id={client_id}", headers=headers)
    connected, _ = await comm.connect(timeout=TIMEOUT)
    assert connected
    tab = Tab(comm, client_id)
    tab.hello = await tab.recv()
    assert tab.hello["type"] == "hello", tab.hello
    return tab


async def two_sessions(user) -> tuple[HttpClient, Tab, HttpClient, Tab]:
    first, second = await database_sync_to_async(logged_in)(user), None
    second = await database_sync_to_async(logged_in)(user)
    tabs = [await tab_of(http, await new_client(user)) for http in (first, second)]
    return first, tabs[0], second, tabs[1]


async def test_logout_closes_the_sockets_of_that_session_only(alice, settings):
    """Logging out closes the sockets opened with that session (4401), not the user's others."""
    settings.CLIENTS_SESSION_CHECK_INTERVAL = 0  # only the event can close it
    first, tab, _, other = await two_sessions(alice)
    response = await database_sync_to_async(first.post)("/accounts/logout/")
    assert response.status_code == 302
    assert await tab.close_code(AT_ONCE) == 4401
    await other.send({"type": "ping"})
    assert (await other.recv_type("pong"))["type"] == "pong"
    await tab.disconnect()
    await other.disconnect()


@pytest.mark.parametrize("change", ["password", "deactivate", "delete"])
async def test_password_change_deactivation_or_deletion_close_every_socket(alice, settings, change):
    """A new password, is_active=False or deleting the user closes all its sockets with 4401."""
    settings.CLIENTS_SESSION_CHECK_INTERVAL = 0
    _, tab, _, other = await two_sessions(alice)

    def apply() -> None:
        user = get_user_model().objects.get(pk=alice.pk)
        if change == "password":
            user.set_password("another-pw-1")
            user.save()
        elif change == "deactivate":
            user.is_active = False
            user.save(update_fields=["is_active"])
        else:
            user.delete()

    await database_sync_to_async(apply)()
    # Deleting the user deletes its clients too: a socket that reads its queue before its
    # session is re-checked finds its client gone first (4404, "deleted client"); either way
    # the socket closes at once, and a tab that registers again is refused (401).
    expected = {4401, 4404} if change == "delete" else {4401}
    assert await tab.close_code(AT_ONCE) in expected
    assert await other.close_code(AT_ONCE) in expected
    await tab.disconnect()
    await other.disconnect()


async def test_last_login_update_closes_nothing(alice, settings):
    """Saves that touch neither the password nor is_active (every login's last_login) close none."""
    settings.CLIENTS_SESSION_CHECK_INTERVAL = 0.2
    _, tab, _, _other = await two_sessions(alice)
    await database_sync_to_async(logged_in)(alice)  # another login: last_login is saved
    assert await tab.nothing(0.6)
    await tab.disconnect()
    await _other.disconnect()


@pytest.mark.parametrize("change", ["session", "deactivate"])
async def test_without_the_event_the_periodic_recheck_closes_the_socket(alice, settings, change):
    """With no channel-layer event (a queryset update, a session deleted by hand), the socket
    closes at the next re-check, within CLIENTS_SESSION_CHECK_INTERVAL."""
    settings.CLIENTS_SESSION_CHECK_INTERVAL = 0.5
    first, tab, _, other = await two_sessions(alice)
    key = first.cookies["sessionid"].value

    def apply() -> None:
        if change == "session":
            SessionRow.objects.filter(session_key=key).delete()
        else:
            get_user_model().objects.filter(pk=alice.pk).update(is_active=False)

    await database_sync_to_async(apply)()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await tab.close_code(3.0) == 4401
    assert loop.time() - started < 1.5
    if change == "session":
        assert await other.nothing(1.0)
    else:
        assert await other.close_code(1.0) == 4401
    await tab.disconnect()
    await other.disconnect()


@pytest.mark.skipif(
    not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")),
    reason="needs PostgreSQL + Redis (DATABASE_URL, REDIS_URL): the second half of make test",
)
async def test_logout_on_one_process_closes_the_socket_on_another(tmp_path):
    """Through two real daphne processes: logging out through A's HTTP closes the socket of that
    session on B (4401) at once; B's socket of another session stays; then a password change
    through A closes that one too."""
    deployment = Deployment(tmp_path, CLIENTS_SESSION_CHECK_INTERVAL="0")
    try:
        deployment.create_user("dora", "dora-pass-1")
        a, b = deployment.start(), deployment.start()
        first, second = Session(a.base_url), Session(a.base_url)
        first.login("dora", "dora-pass-1")
        second.login("dora", "dora-pass-1")
        sockets = []
        for session in (first, second):
            status, created = session.request("POST", "/api/clients/")
            assert status == 201
            url = f"{b.ws_url}/ws/?client_id={created['client_id']}"
            ws = await websockets.connect(url, additional_headers=session.ws_headers(b.base_url))
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "hello"
            sockets.append(ws)
        status, _ = first.request("POST", "/accounts/logout/")
        assert status == 200  # the login page, after the redirect
        assert await closed_with(sockets[0], AT_ONCE) == 4401
        await sockets[1].send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(sockets[1].recv(), 5))["type"] == "pong"
        deployment.manage(
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model as g; "
            "u = g().objects.get(username='dora'); u.set_password('dora-pass-2'); u.save()",
        )
        assert await closed_with(sockets[1], AT_ONCE) == 4401
    finally:
        deployment.close()


async def closed_with(ws, timeout: float) -> int | None:
    """The close code the server sent, waiting at most `timeout` seconds for it."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    return closed.value.rcvd.code if closed.value.rcvd else None


def test_revoked_among_tells_each_kind_of_revoked_session(
    monkeypatch, django_assert_max_num_queries
):
    """One batch check names exactly the sessions that no longer log their user in."""
    monkeypatch.setattr(client_sessions, "CHUNK", 2)
    users = [make_user(f"u{i}") for i in range(5)]
    creds = [(u.pk, logged_in(u).cookies["sessionid"].value) for u in users]
    SessionRow.objects.filter(session_key=creds[0][1]).delete()  # logged out
    users[1].set_password("changed-pw-1")
    users[1].save()
    get_user_model().objects.filter(pk=users[2].pk).update(is_active=False)
    users[3].delete()
    wrong_user = (users[0].pk, creds[4][1])  # a session of another user
    with django_assert_max_num_queries(6):
        revoked = client_sessions.revoked_among([*creds, wrong_user])
    assert revoked == {creds[0], creds[1], creds[2], creds[3], wrong_user}


def test_a_negative_recheck_interval_is_a_system_check_error(settings):
    """CLIENTS_SESSION_CHECK_INTERVAL below 0 is refused at start-up (clients.E001)."""
    settings.CLIENTS_SESSION_CHECK_INTERVAL = -1
    (error,) = check_settings()
    assert error.id == "clients.E001" and "CLIENTS_SESSION_CHECK_INTERVAL" in error.msg
