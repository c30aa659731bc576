"""The operator's overview in the admin: who may see it, and that it shows the real numbers."""

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone

from clients.models import Client, ServerProcess
from messaging import services
from tests.conftest import http_as, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(db):
    user = make_user("ops")
    user.is_staff = True
    user.save()
    user.user_permissions.add(Permission.objects.get(codename="view_client"))
    return user


def test_anonymous_and_non_staff_are_sent_to_the_login(alice):
    """Without a staff login, the overview redirects to the admin's login page."""
    for client in (http_as(None), http_as(alice)):
        response = client.get("/admin/overview/")
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")


def test_staff_without_the_view_permission_is_refused(alice):
    """Staff who may not view clients get 403, and no link on the index."""
    alice.is_staff = True
    alice.save()
    assert http_as(alice).get("/admin/overview/").status_code == 403
    index = http_as(alice).get("/admin/")
    assert index.status_code == 200 and b"/admin/overview/" not in index.content


def test_overview_shows_states_processes_queues_and_the_hour(
    operator, alice, bob, django_assert_max_num_queries
):
    """The index links it; it counts clients per state, tabs per process, queues, messages."""
    now = timezone.now()
    ServerProcess.objects.create(id="web-1", hostname="web", pid=11, heartbeat_at=now)
    a = Client.objects.create(user=alice, channel_name="specific.x!1", server="web-1")
    Client.objects.create(user=alice, closing_at=now)
    Client.objects.create(user=bob, last_seen_at=now - timedelta(days=30))
    b = Client.objects.create(user=bob)
    for i in range(3):
        services.send_message(alice, a.pk, f"m{i}", {"user": "bob"}, {"text": i})

    index = http_as(operator).get("/admin/")
    assert b'href="/admin/overview/"' in index.content
    staff = http_as(operator)
    with django_assert_max_num_queries(12):  # a fixed number, whatever the rows
        page = staff.get("/admin/overview/").content.decode()

    def number(attribute: str) -> int:
        match = re.search(rf"{attribute}[^>]*>(?:at least )?(\d+)<", page)
        assert match, attribute
        return int(match.group(1))

    assert number('data-state="connected"') == 1
    assert number('data-state="closing"') == 1
    assert number('data-state="stale"') == 1
    assert number('data-state="idle"') == 1
    assert re.search(r'data-process="web-1">(?s:.*?)data-sockets>1<', page)
    assert re.search(rf'data-client="{b.pk}">(?s:.*?)data-depth>3<', page)
    assert number('id="messages-last-hour"') == 3
    assert page.count('<rect class="direct"') >= 1 and "<svg" in page
