"""
Settings of the clients app with their defaults, read at call time so override_settings works.
"""

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # Seconds without a connection or any request after which a client is stale and deleted.
    "CLIENTS_STALE_AFTER": 24 * 60 * 60,
    # Seconds a client marked closing (pagehide beacon) has to come back before it is deleted.
    "CLIENTS_CLOSE_GRACE": 30,
    # Seconds between runs of the in-process periodic cleanup; 0 turns it off.
    "CLIENTS_CLEANUP_INTERVAL": 60,
    # Whether each server process runs the heartbeat and periodic cleanup itself.
    "CLIENTS_RUN_PERIODIC": True,
    # Seconds between a server process's heartbeats, and after which a silent one counts as dead
    # (its sockets are then marked disconnected).
    "CLIENTS_HEARTBEAT_INTERVAL": 10,
    "CLIENTS_PROCESS_TIMEOUT": 45,
    # Seconds between a process's re-checks of its open sockets' login sessions (one batch); a
    # socket whose session was logged out, or whose user changed password or was deactivated,
    # closes with 4401 by then at the latest (at once when the channel layer's event arrives).
    # 0 turns the periodic re-check off.
    "CLIENTS_SESSION_CHECK_INTERVAL": 5,
    # last_seen is written at most this often (seconds) for HTTP activity.
    "CLIENTS_TOUCH_INTERVAL": 30,
    # Most clients (tabs) one user may have; registering one more evicts the least recently
    # seen (see clients.services.register_client). None: no bound.
    "CLIENTS_MAX_PER_USER": 50,
}


def get(name: str) -> Any:
    """
    Return the setting `name`, or its default.
    """
    return getattr(settings, name, DEFAULTS[name])
