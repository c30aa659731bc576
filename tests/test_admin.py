"""The admin renders every model's pages, with a query count that does not grow with rows."""

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext

from clients.models import Client
from clients.services import register_client
from messaging import services
from messaging.models import Delivery, Message, Room
from tests.conftest import http_as

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_http(db):
    user = get_user_model().objects.create_superuser("root", password="pw")
    return http_as(user)


def populate(n: int) -> None:
    users = [get_user_model().objects.create_user(f"u{n}-{i}") for i in range(n)]
    room = Room.objects.create(name=f"room{n}")
    room.members.add(*users)
    for i, user in enumerate(users):
        client = register_client(user)
        services.send_message(user, client.pk, f"m{i}", {"room": room.name}, {"i": i})


def changelist_queries(admin_http, url: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        assert admin_http.get(url).status_code == 200
    return len(ctx.captured_queries)


@pytest.mark.parametrize(
    "url",
    [
        "/admin/clients/client/",
        "/admin/messaging/message/",
        "/admin/messaging/delivery/",
        "/admin/messaging/room/",
        "/admin/auth/user/",
    ],
)
def test_changelists_render_with_bounded_queries(admin_http, url):
    """Each changelist answers 200, and ten times the rows costs no extra queries."""
    populate(2)
    few = changelist_queries(admin_http, url)
    populate(20)
    many = changelist_queries(admin_http, url)
    assert many <= few, f"{url}: {few} queries for few rows, {many} for many"


def test_change_pages_render(admin_http):
    """The change page of one object of every model answers 200."""
    populate(3)
    for url in (
        f"/admin/clients/client/{Client.objects.first().pk}/change/",
        f"/admin/messaging/message/{Message.objects.first().pk}/change/",
        f"/admin/messaging/delivery/{Delivery.objects.first().pk}/change/",
        f"/admin/messaging/room/{Room.objects.first().pk}/change/",
    ):
        response = admin_http.get(url)
        assert response.status_code == 200, url


def test_message_page_shows_body_and_deliveries(admin_http):
    """A message's admin page shows its body and its deliveries inline."""
    populate(2)
    message = Message.objects.first()
    page = admin_http.get(f"/admin/messaging/message/{message.pk}/change/").content.decode()
    assert "{&quot;i&quot;: 0}" in page or '{"i": 0}' in page
    assert "Deliveries" in page


def test_login_page_and_home(client, django_user_model):
    """A person reaches the login page, logs in, and sees the home page with the admin link."""
    django_user_model.objects.create_superuser("boss", password="pw-boss-123")
    assert client.get("/").status_code == 302
    assert client.get("/accounts/login/").status_code == 200
    response = client.post("/accounts/login/", {"username": "boss", "password": "pw-boss-123"})
    assert response.status_code == 302
    home = client.get("/")
    assert home.status_code == 200 and b"/admin/" in home.content
