"""
The login behind an open socket, checked again after connect.

A socket is authenticated once, at its handshake; logout, a password change, deactivation or
deletion of the user must still reach it. Two ways, so that a lost channel-layer event costs
seconds, not the socket's lifetime:

- at once: the signals below send an event to the user's group, which every socket of the user
  joins (`clients.logout` names the logged-out session; `clients.reauth` makes the sockets of
  the user's process re-check);
- at most every CLIENTS_SESSION_CHECK_INTERVAL seconds: each process re-checks all its sockets'
  sessions in one batch (`SessionWatch`), as Django's `get_user` would on an HTTP request.

A socket whose session no longer holds is closed with 4401.
"""

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.sessions.models import Session
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from clients import conf
from clients.models import user_group
from clients.push import group_send_after_commit

logger = logging.getLogger(__name__)

Credentials = tuple[Any, str]  # (user pk, session key) of one socket

# Keys per query: well under SQLite's and PostgreSQL's limits on parameters.
CHUNK = 500

# Session engines whose sessions all live in the django_session table (cached_db writes through
# to it and deletes from it): one query reads any number of them.
_DB_ENGINES = {"django.contrib.sessions.backends.db", "django.contrib.sessions.backends.cached_db"}


def session_digest(session_key: str | None) -> str:
    """
    A digest of a session key, to name a session in channel-layer events (not the key itself).
    """
    return hashlib.sha256((session_key or "").encode()).hexdigest()


def _session_data(keys: set[str]) -> dict[str, dict]:
    engine = settings.SESSION_ENGINE
    store_class = import_module(engine).SessionStore
    found: dict[str, dict] = {}
    if engine in _DB_ENGINES:
        decode, now, ordered = store_class().decode, timezone.now(), sorted(keys)
        for start in range(0, len(ordered), CHUNK):
            rows = Session.objects.filter(
                session_key__in=ordered[start : start + CHUNK], expire_date__gt=now
            )
            for key, data in rows.values_list("session_key", "session_data"):
                found[key] = decode(data)
        return found
    for key in keys:
        data = store_class(session_key=key).load()
        if data:
            found[key] = data
    return found


def _holds(user: Any, data: dict) -> bool:
    # What django.contrib.auth.get_user checks on every request: the session names the user,
    # the user may still log in, and the session's hash matches the user's password (or the
    # hash under a SECRET_KEY_FALLBACKS key).
    if user is None or str(data.get(SESSION_KEY)) != str(user.pk):
        return False
    if not getattr(user, "is_active", True):
        return False
    stored = data.get(HASH_SESSION_KEY)
    if not stored:
        return False
    if constant_time_compare(stored, user.get_session_auth_hash()):
        return True
    fallbacks = getattr(user, "get_session_auth_fallback_hash", None)
    return fallbacks is not None and any(constant_time_compare(stored, h) for h in fallbacks())


def revoked_among(credentials: Iterable[Credentials]) -> set[Credentials]:
    """
    The (user pk, session key) pairs whose session no longer logs that user in: logged out,
    expired, another password, an inactive or deleted user. Two queries per 500 sockets.
    """
    wanted = set(credentials)
    if not wanted:
        return set()
    pks = sorted({pk for pk, _ in wanted})
    users = {}
    for start in range(0, len(pks), CHUNK):
        for user in get_user_model().objects.filter(pk__in=pks[start : start + CHUNK]):
            users[user.pk] = user
    sessions = _session_data({key for _, key in wanted})
    return {
        (pk, key)
        for pk, key in wanted
        if key not in sessions or not _holds(users.get(pk), sessions[key])
    }


class SessionWatch:
    """
    The sockets of one event loop (one server process) and the periodic re-check of their
    sessions, run in one batch by a task that lives while sockets are registered.
    """

    def __init__(self, run_db: Callable[[Any], Any]) -> None:
        self.run_db = run_db
        self.sockets: dict[Any, tuple[Credentials, Callable[[], None]]] = {}
        self.task: asyncio.Task | None = None
        self.wake = asyncio.Event()

    def add(self, socket: Any, credentials: Credentials, revoke: Callable[[], None]) -> None:
        """
        Watch the session of `socket`; `revoke()` is called once it no longer holds.
        """
        self.sockets[socket] = (credentials, revoke)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    def discard(self, socket: Any) -> None:
        """
        Stop watching `socket` (the task ends with the last one).
        """
        self.sockets.pop(socket, None)
        if not self.sockets:
            self.wake.set()

    def check_soon(self) -> None:
        """
        Re-check every watched session now (a `clients.reauth` event): one batch for all the
        sockets of the process that got the event.
        """
        self.wake.set()

    async def _run(self) -> None:
        while self.sockets:
            interval = conf.get("CLIENTS_SESSION_CHECK_INTERVAL")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), interval or None)
            self.wake.clear()
            if not self.sockets:
                return
            watched = dict(self.sockets)
            try:
                revoked = await self.run_db(revoked_among)({c for c, _ in watched.values()})
            except Exception as exc:
                # The database is away: the sockets stay (HTTP cannot log anyone in meanwhile
                # either); the next round checks again.
                logger.warning("session re-check of %d socket(s) failed: %r", len(watched), exc)
                continue
            for socket, (credentials, revoke) in watched.items():
                if credentials in revoked and self.sockets.pop(socket, None) is not None:
                    revoke()


def user_logged_out_receiver(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    """
    Close the sockets opened with the session that just logged out, on every process.
    """
    key = getattr(getattr(request, "session", None), "session_key", None)
    if user is None or not key:
        return
    event = {"type": "clients.logout", "session": session_digest(key)}
    group_send_after_commit([(user_group(user.pk), event)])


def user_saved_receiver(
    sender: Any, instance: Any, update_fields: Any = None, **kwargs: Any
) -> None:
    """
    After a save that may change the password or is_active, every socket of the user re-checks.
    """
    if kwargs.get("created") or kwargs.get("raw"):
        return
    if update_fields is not None and not {"password", "is_active"} & set(update_fields):
        return  # e.g. the last_login written by every login
    group_send_after_commit([(user_group(instance.pk), {"type": "clients.reauth"})])


def user_deleted_receiver(sender: Any, instance: Any, **kwargs: Any) -> None:
    """
    A deleted user's sockets re-check (and close).
    """
    group_send_after_commit([(user_group(instance.pk), {"type": "clients.reauth"})])
