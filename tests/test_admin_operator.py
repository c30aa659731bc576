"""The admin as an operator's tool: filters over tab state, and disconnect/delete actions."""

import asyncio
import json
import urllib.parse
import urllib.request
from datetime import timedelta

import pytest
import websockets
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.utils import timezone

from clients.models import Client, ServerProcess
from clients.services import register_client
from tests.conftest import connect_tab, http_as, new_client
from tests.servers import Deployment, Session

CHANGELIST = "/admin/clients/client/"


def superuser_http():
    return http_as(get_user_model().objects.create_superuser("root", password="pw"))


def listed(http, query: str) -> set[str]:
    response = http.get(f"{CHANGELIST}?{query}")
    assert response.status_code == 200
    return {str(c.pk) for c in response.context["cl"].result_list}


@pytest.mark.django_db
def test_filters_pick_connected_stale_and_closing_clients(alice, settings):
    """connected / stale / closing filters list exactly the matching tabs."""
    settings.CLIENTS_STALE_AFTER = 3600
    settings.CLIENTS_CLOSE_GRACE = 30
    now = timezone.now()
    ids = {
        name: str(register_client(alice).pk)
        for name in ("live", "stale", "fresh", "closing_new", "closing_old")
    }
    Client.objects.filter(pk=ids["live"]).update(channel_name="specific.a!1")
    Client.objects.filter(pk=ids["stale"]).update(last_seen_at=now - timedelta(hours=2))
    Client.objects.filter(pk=ids["closing_new"]).update(closing_at=now)
    Client.objects.filter(pk=ids["closing_old"]).update(closing_at=now - timedelta(minutes=5))
    http = superuser_http()
    assert listed(http, "connected=yes") == {ids["live"]}
    assert ids["live"] not in listed(http, "connected=no")
    assert listed(http, "stale=yes") == {ids["stale"]}
    assert listed(http, "closing=grace") == {ids["closing_new"]}
    assert listed(http, "closing=expired") == {ids["closing_old"]}
    assert ids["closing_old"] not in listed(http, "closing=no")


@pytest.mark.django_db(transaction=True)
async def test_disconnect_action_closes_the_socket_and_the_tab_can_resume(alice):
    """The disconnect action closes the tab's socket (1012) and keeps its client and queue."""
    cid = await new_client(alice)
    tab = await connect_tab(alice, cid)
    http = await database_sync_to_async(superuser_http)()
    response = await database_sync_to_async(http.post)(
        CHANGELIST, {"action": "disconnect", "_selected_action": [cid]}
    )
    assert response.status_code == 302
    assert await tab.close_code() == 1012
    await tab.disconnect()
    assert await database_sync_to_async(Client.objects.filter(pk=cid).exists)()
    again = await connect_tab(alice, cid)
    assert again.hello["client_id"] == cid
    await again.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_delete_action_removes_clients_and_closes_their_sockets(alice):
    """The delete action removes the tab with its queue and closes its socket with 4404."""
    cid, keep = await new_client(alice), await new_client(alice)
    tab = await connect_tab(alice, cid)
    http = await database_sync_to_async(superuser_http)()
    response = await database_sync_to_async(http.post)(
        CHANGELIST, {"action": "delete_with_queues", "_selected_action": [cid]}
    )
    assert response.status_code == 302
    assert await tab.close_code() == 4404
    await tab.disconnect()
    remaining = await database_sync_to_async(
        lambda: {str(r) for r in Client.objects.values_list("id", flat=True)}
    )()
    assert remaining == {keep}


@pytest.mark.django_db
def test_server_processes_page_shows_liveness(settings):
    """The server-process list renders and tells a silent process from a live one."""
    settings.CLIENTS_PROCESS_TIMEOUT = 30
    ServerProcess.objects.create(id="live", heartbeat_at=timezone.now())
    ServerProcess.objects.create(id="dead", heartbeat_at=timezone.now() - timedelta(minutes=5))
    http = superuser_http()
    response = http.get("/admin/clients/serverprocess/")
    assert response.status_code == 200
    rows = {p.id: p for p in response.context["cl"].result_list}
    model_admin = response.context["cl"].model_admin
    assert model_admin.alive(rows["live"]) is True
    assert model_admin.alive(rows["dead"]) is False


def viewer_http():
    """An operator (staff) with only "Can view client"."""
    viewer = get_user_model().objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_client"))
    return http_as(viewer)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("action", ["disconnect", "delete_with_queues"])
async def test_view_only_operator_is_neither_offered_nor_allowed_the_actions(alice, action):
    """A staff user with only the view permission sees no action and a posted one does nothing."""
    cid = await new_client(alice)
    tab = await connect_tab(alice, cid)
    http = await database_sync_to_async(viewer_http)()
    page = await database_sync_to_async(http.get)(CHANGELIST)
    assert page.status_code == 200
    assert action not in page.context["cl"].model_admin.get_actions(page.wsgi_request)
    await database_sync_to_async(http.post)(
        CHANGELIST, {"action": action, "_selected_action": [cid]}
    )
    assert await tab.nothing(0.5)
    assert await database_sync_to_async(Client.objects.filter(pk=cid).exists)()
    await tab.disconnect()


async def test_disconnect_action_closes_with_1012_under_daphne(tmp_path):
    """Through a real daphne the disconnect action's close code is 1012, not 1011."""
    deployment = Deployment(tmp_path)
    try:
        deployment.create_user("dora", "dora-pass-1")
        deployment.manage(
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model as g; "
            "g().objects.create_superuser('root', password='root-pass-1')",
        )
        server = deployment.start()
        dora, root = Session(server.base_url), Session(server.base_url)
        dora.login("dora", "dora-pass-1")
        root.login("root", "root-pass-1")
        status, created = dora.request("POST", "/api/clients/")
        assert status == 201
        cid = created["client_id"]
        url = f"{server.ws_url}/ws/?client_id={cid}"
        async with websockets.connect(url, additional_headers=dora.ws_headers()) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "hello"
            form = {"action": "disconnect", "_selected_action": cid}
            await asyncio.to_thread(post_form, root, CHANGELIST, form)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    finally:
        deployment.close()


def post_form(session: Session, path: str, form: dict) -> int:
    """POST a form with the session's CSRF token, as the admin's pages do; the status."""
    data = urllib.parse.urlencode({**form, "csrfmiddlewaretoken": session.cookie("csrftoken")})
    request = urllib.request.Request(
        session.base_url + path,
        data=data.encode(),
        method="POST",
        headers={"Referer": session.base_url + path},
    )
    with session.opener.open(request, timeout=10) as response:
        return response.status
