"""The admin as an operator's tool: filters over tab state, and disconnect/delete actions."""

from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.utils import timezone

from clients.models import Client, ServerProcess
from clients.services import register_client
from tests.conftest import connect_tab, http_as, new_client

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
