"""
Login throttling: failed logins lock out the account and the address for a while, the right
password included, with a clear answer; normal use is never locked out.
"""

import urllib.error

import pytest
from django.test import Client as HttpClient

from tests.conftest import make_user
from tests.servers import Deployment, Session

pytestmark = pytest.mark.django_db

LOGIN = "/accounts/login/"


@pytest.fixture(autouse=True)
def _limits(settings):
    settings.AXES_FAILURE_LIMIT = 5


def attempt(username: str, password: str, address: str = "10.0.0.1", **extra) -> tuple:
    """One login through the login form from `address`; (status, logged in, response)."""
    http = HttpClient()
    response = http.post(
        LOGIN, {"username": username, "password": password}, REMOTE_ADDR=address, **extra
    )
    return response.status_code, "sessionid" in http.cookies, response


def test_many_wrong_passwords_then_the_right_one_is_refused():
    """After the failure limit, the right password does not log in: the login page says why, 429."""
    make_user("alice")
    for _ in range(4):
        status, logged_in, _ = attempt("alice", "wrong")
        assert (status, logged_in) == (200, False)
    assert attempt("alice", "wrong")[:2] == (429, False)  # the fifth failure locks
    status, logged_in, response = attempt("alice", "pw-alice")
    assert (status, logged_in) == (429, False)
    page = response.content.decode()
    assert "Too many failed logins" in page and "15 minutes" in page
    assert 'id="login-form"' in page
    assert int(response["Retry-After"]) == 900


def test_account_is_locked_whatever_the_address():
    """Failures for one account from many addresses lock that account everywhere."""
    make_user("alice")
    for i in range(5):
        attempt("alice", "wrong", address=f"10.0.1.{i}")
    assert attempt("alice", "pw-alice", address="10.0.2.1")[:2] == (429, False)


def test_address_is_locked_whatever_the_account():
    """Failures from one address over many accounts lock that address, for every account."""
    make_user("alice")
    for i in range(5):
        attempt(f"nobody{i}", "wrong", address="10.0.3.1")
    assert attempt("alice", "pw-alice", address="10.0.3.1")[:2] == (429, False)
    assert attempt("alice", "pw-alice", address="10.0.3.2")[:2] == (302, True)


def test_json_login_is_answered_with_a_429_error_body():
    """A client that asks for JSON gets the protocol's error shape with a stable code."""
    make_user("alice")
    for _ in range(5):
        attempt("alice", "wrong")
    status, _, response = attempt("alice", "pw-alice", HTTP_ACCEPT="application/json")
    assert status == 429
    assert response.json()["error"]["code"] == "login_throttled"


def test_successful_logins_clear_their_own_failures_only():
    """A user's right password clears its own typos, so normal use never locks it out; it does
    not clear the failures the same address made against other accounts."""
    make_user("alice")
    make_user("mallory")
    for _ in range(3):
        for _ in range(4):
            attempt("alice", "typo")
        assert attempt("alice", "pw-alice")[:2] == (302, True)
    for _ in range(3):
        attempt("alice", "guess", address="10.0.4.1")
    assert attempt("mallory", "pw-mallory", address="10.0.4.1")[:2] == (302, True)
    attempt("alice", "guess", address="10.0.4.1")
    attempt("alice", "guess", address="10.0.4.1")
    assert attempt("alice", "pw-alice", address="10.0.5.1")[:2] == (429, False)


def test_forwarded_for_counts_only_behind_a_configured_proxy(settings):
    """X-Forwarded-For names the address only when a proxy in front is configured."""
    make_user("alice")
    spoofed = {"HTTP_X_FORWARDED_FOR": "10.9.9.9"}
    for i in range(5):
        attempt(f"nobody{i}", "wrong", address="10.0.6.1", HTTP_X_FORWARDED_FOR=f"10.0.7.{i}")
    assert attempt("alice", "pw-alice", address="10.0.6.1", **spoofed)[:2] == (429, False)
    settings.AXES_IPWARE_PROXY_COUNT = 1
    for i in range(5):
        attempt(f"other{i}", "wrong", address="10.0.8.1", HTTP_X_FORWARDED_FOR="10.0.9.1")
    assert attempt("alice", "pw-alice", address="10.0.8.1", HTTP_X_FORWARDED_FOR="10.0.9.1")[
        :2
    ] == (429, False)
    assert attempt("alice", "pw-alice", address="10.0.8.1", HTTP_X_FORWARDED_FOR="10.0.9.2")[
        :2
    ] == (302, True)


def test_lockout_holds_across_real_server_processes(tmp_path):
    """Through two real daphne processes (ASGI): failures on one lock the account on the other."""
    deployment = Deployment(tmp_path)
    try:
        deployment.create_user("dora", "dora-pass-1")
        a, b = deployment.start(), deployment.start()
        for _ in range(4):
            with pytest.raises(PermissionError):
                Session(a.base_url).login("dora", "wrong")
        with pytest.raises(urllib.error.HTTPError) as refused:
            Session(a.base_url).login("dora", "wrong")
        assert refused.value.code == 429
        with pytest.raises(urllib.error.HTTPError) as refused:
            Session(b.base_url).login("dora", "dora-pass-1")
        assert refused.value.code == 429
        assert "Too many failed logins" in refused.value.read().decode()
    finally:
        deployment.close()
