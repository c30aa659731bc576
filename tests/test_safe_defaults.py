"""Safe defaults: DEBUG is off unless asked for, there is no fallback secret key, request data that
Django refuses is a plain 400 in both DEBUG modes, and the documented production environment
passes `manage.py check --deploy`."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import http_as, register

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_ENV = ROOT / "deploy" / "production.env"


def env_file(path: Path) -> dict[str, str]:
    """
    The KEY=value lines of an EnvironmentFile (comments and blank lines skipped).
    """
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def bare_env(**extra: str) -> dict[str, str]:
    """
    This process's environment without any Django setting, plus `extra`.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "PYTEST", "DATABASE_", "REDIS_"))
    }
    return {**env, **extra}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_debug_is_off_when_nothing_sets_it():
    """DEBUG is off unless DJANGO_DEBUG turns it on."""
    show = ["manage.py", "shell", "-c", "from django.conf import settings; print(settings.DEBUG)"]
    key = secrets.token_urlsafe(50)
    assert run(show, bare_env(DJANGO_SECRET_KEY=key)).stdout.split()[-1] == "False"
    assert run(show, bare_env(DJANGO_SECRET_KEY=key, DJANGO_DEBUG="1")).stdout.split()[-1] == "True"


@pytest.mark.parametrize(
    "command",
    [
        ["manage.py", "check"],
        ["-m", "daphne", "-b", "127.0.0.1", "-p", "0", "chatproject.asgi:application"],
    ],
    ids=["check", "daphne"],
)
def test_no_secret_key_refuses_to_start_with_a_clear_message(command):
    """Without DJANGO_SECRET_KEY the server and manage.py exit at once, saying what to set."""
    done = run(command, bare_env())
    assert done.returncode != 0
    assert "DJANGO_SECRET_KEY is not set" in done.stderr


def test_check_deploy_is_clean_with_the_documented_production_environment():
    """deploy/production.env (with a key) passes check --deploy; the bare defaults do not."""
    documented = env_file(PRODUCTION_ENV)
    assert documented["DJANGO_SECRET_KEY"] == "", "the documented file must not carry a key"
    key = secrets.token_urlsafe(50)
    check = ["manage.py", "check", "--deploy", "--fail-level", "WARNING"]
    done = run(check, bare_env(**{**documented, "DJANGO_SECRET_KEY": key}))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stdout + done.stderr
    bare = run(check, bare_env(DJANGO_SECRET_KEY=key))
    assert bare.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in bare.stderr


MANY_FIELDS = "&".join(f"f{i}=1" for i in range(1500))


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
@pytest.mark.parametrize(
    "path, extra",
    [
        ("/api/rooms/", {"HTTP_HOST": "evil.example"}),
        ("/accounts/login/", {"HTTP_HOST": "evil.example"}),
        ("/api/clients/{client}/messages?" + MANY_FIELDS, {}),
        ("/accounts/login/?" + MANY_FIELDS, {}),
    ],
    ids=["foreign-host-api", "foreign-host-page", "many-fields-api", "many-fields-page"],
)
def test_request_data_django_refuses_is_a_plain_400(alice, settings, debug, path, extra):
    """A foreign Host or 1,500 query fields: 400 without Django's technical page, DEBUG or not."""
    settings.DEBUG = debug
    http = http_as(alice)
    http.raise_request_exception = False
    response = http.get(path.format(client=register(http)), **extra)
    assert response.status_code == 400
    assert b"<html" not in response.content.lower()
    if path.startswith("/api/"):
        assert response.json()["error"]["code"] == "malformed"


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
def test_a_login_form_with_too_many_fields_is_a_plain_400(settings, debug):
    """1,500 fields posted to the login form: 400 without Django's technical page."""
    settings.DEBUG = debug
    http = http_as(None)
    http.raise_request_exception = False
    response = http.post(
        "/accounts/login/", MANY_FIELDS, content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 400
    assert b"<html" not in response.content.lower()
