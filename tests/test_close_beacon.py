"""The close beacon: it marks its own page's client closing, never one a newer socket holds."""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from clients import services as client_services
from clients.cleanup import cleanup_clients
from clients.models import Client
from tests.conftest import api_post, http_as, register

pytestmark = pytest.mark.django_db(transaction=True)
GRACE = 30


def reload_cycle(user, cid: str) -> None:
    """A page with socket attempt 1 reloads: its socket goes, the new page attaches attempt 2."""
    client_services.attach(user, cid, "specific.old!chan", attempt=1)
    client_services.detach(cid, "specific.old!chan")
    client_services.attach(user, cid, "specific.new!chan", attempt=2)


def test_a_beacon_arriving_after_the_reloaded_page_attached_is_ignored(alice, settings):
    """The old page's beacon (conn=1) reaching the server after the reloaded page attached
    (conn=2) leaves the client unmarked, so a later long disconnect does not delete it."""
    settings.CLIENTS_CLOSE_GRACE = GRACE
    http = http_as(alice)
    cid = register(http)
    reload_cycle(alice, cid)

    assert api_post(http, f"/api/clients/{cid}/close?conn=1").status_code == 204
    assert Client.objects.get(pk=cid).closing_at is None

    # The reloaded tab loses its network for longer than the grace period.
    client_services.detach(cid, "specific.new!chan")
    later = timezone.now() + timedelta(seconds=GRACE + 5)
    assert cleanup_clients(now=later).closed == []
    assert Client.objects.filter(pk=cid).exists()


def test_the_beacon_of_the_current_page_still_closes_the_client(alice, settings):
    """A beacon carrying the latest attempt marks the client, which goes after the grace."""
    settings.CLIENTS_CLOSE_GRACE = GRACE
    http = http_as(alice)
    cid = register(http)
    reload_cycle(alice, cid)

    # The beacon may beat the socket's close to the server.
    assert api_post(http, f"/api/clients/{cid}/close?conn=2").status_code == 204
    client_services.detach(cid, "specific.new!chan")
    closing_at = Client.objects.get(pk=cid).closing_at
    assert closing_at is not None
    assert cleanup_clients(now=closing_at + timedelta(seconds=GRACE + 1)).closed == [uuid.UUID(cid)]


@pytest.mark.parametrize("conn", ["-1", "x", "1.5", "9" * 20])
def test_a_malformed_conn_is_400(alice, conn):
    """conn must be a non-negative integer: 400 invalid_conn, and nothing is marked."""
    http = http_as(alice)
    cid = register(http)
    response = api_post(http, f"/api/clients/{cid}/close?conn={conn}")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_conn"
    assert Client.objects.get(pk=cid).closing_at is None


def test_a_beacon_without_conn_counts_as_the_oldest_page(alice, settings):
    """A beacon without `conn` (a page from before it, or a client that never numbers its
    sockets) cannot close a client a numbered socket attached since; a client that never sent
    a number is closed by it as before."""
    settings.CLIENTS_CLOSE_GRACE = GRACE
    http = http_as(alice)
    numbered, plain = register(http), register(http)
    reload_cycle(alice, numbered)
    client_services.attach(alice, plain, "specific.plain!chan", attempt=None)

    assert api_post(http, f"/api/clients/{numbered}/close").status_code == 204
    assert Client.objects.get(pk=numbered).closing_at is None
    assert api_post(http, f"/api/clients/{plain}/close").status_code == 204
    assert Client.objects.get(pk=plain).closing_at is not None
