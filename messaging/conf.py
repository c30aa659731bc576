"""
Settings of the messaging app with their defaults, read at call time so override_settings works.
"""

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # Largest message body, as compact UTF-8 JSON (bytes).
    "MESSAGING_MAX_BODY_BYTES": 64 * 1024,
    # Most unacked deliveries one client may hold; past it the client must resync from history.
    "MESSAGING_QUEUE_LIMIT": 10_000,
    # Sends per second per client (token bucket refill) and the bucket size; None turns it off.
    # Held across processes with MESSAGING_RATE_REDIS_URL (messaging.ratelimit).
    "MESSAGING_SEND_RATE": 50.0,
    "MESSAGING_SEND_BURST": 200,
    # The same for all the clients of one user together; None turns it off.
    "MESSAGING_USER_SEND_RATE": 100.0,
    "MESSAGING_USER_SEND_BURST": 400,
    # Where the send buckets live so that they hold across processes (a redis:// URL; settings
    # sets it from REDIS_URL), and their key prefix; None: in each process.
    "MESSAGING_RATE_REDIS_URL": None,
    "MESSAGING_RATE_REDIS_PREFIX": "tabrelay",
    # Rooms one user may create (rooms are never deleted); past it: 409 too_many_rooms. None:
    # no bound.
    "MESSAGING_MAX_ROOMS_PER_USER": 100,
    # Per socket: a typing frame is relayed at most once per this many seconds per room (the
    # rest are dropped, with one rate_limited error frame); None: no bound.
    "MESSAGING_TYPING_INTERVAL": 1.0,
    # Per socket: pings per second answered (token bucket refill) and the bucket size; a ping
    # past them gets a rate_limited error frame instead of a pong. None: no bound.
    "MESSAGING_PING_RATE": 1.0,
    "MESSAGING_PING_BURST": 10,
    # Deliveries read from the database per query when a socket catches up.
    "MESSAGING_REPLAY_BATCH": 500,
    # Seconds to keep message history once no queue holds the message; None keeps it forever.
    # (A retry of a pruned message's client_msg_id would be stored again.)
    "MESSAGING_HISTORY_RETENTION": None,
    # Default and largest `limit` of the HTTP list calls.
    "MESSAGING_PAGE_DEFAULT": 100,
    "MESSAGING_PAGE_MAX": 1000,
    # The `from.server` label of messages the server publishes without a sender of their own.
    "MESSAGING_SERVER_SENDER": "server",
    # The bearer token of POST /api/server/publish (docs/publish.md); None: the endpoint is off
    # (404).
    "MESSAGING_SERVER_API_TOKEN": None,
    # Under daphne, delivery frames are written to the socket directly (messaging.frames).
    "MESSAGING_DIRECT_FRAMES": True,
    # Who may read /metrics (messaging.metrics): a bearer token, and/or addresses or networks
    # (a list, or a comma-separated string). Both set: both are required. Neither: 404 for all.
    "MESSAGING_METRICS_TOKEN": None,
    "MESSAGING_METRICS_ALLOWED_IPS": [],
}


def get(name: str) -> Any:
    """
    Return the setting `name`, or its default.
    """
    return getattr(settings, name, DEFAULTS[name])


def max_frame_bytes() -> int:
    """
    A frame carrying a body of the largest size, compactly encoded, with room for the envelope.
    """
    return int(get("MESSAGING_MAX_BODY_BYTES")) + 4096


def max_request_bytes() -> int:
    """
    The largest HTTP request body read. The body limit counts compact UTF-8, but a request may
    spell the body with \\uXXXX escapes (up to 6 bytes per byte), so a body within the limit is
    never refused for how it is escaped; the body itself is measured exactly by validation.
    """
    return 6 * int(get("MESSAGING_MAX_BODY_BYTES")) + 4096
