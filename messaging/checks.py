"""System checks for the messaging app."""

from typing import Any

from django.core.checks import Error, register

from messaging import conf, metrics

# daphne drops frames over this size without a close frame, so the app's own limit must stay below.
DAPHNE_MAX_FRAME = 1024 * 1024
# The shortest bearer token of the server API (secrets.token_urlsafe(32) gives 43 characters).
SERVER_TOKEN_MIN = 32


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """
    Reject limits that are not positive numbers, and a body limit daphne would silently undercut.
    """
    errors = []
    for name in (
        "MESSAGING_MAX_BODY_BYTES",
        "MESSAGING_QUEUE_LIMIT",
        "MESSAGING_REPLAY_BATCH",
        "MESSAGING_PAGE_DEFAULT",
        "MESSAGING_PAGE_MAX",
    ):
        value = conf.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            errors.append(
                Error(f"{name} must be a positive integer, not {value!r}.", id="messaging.E001")
            )
    if not errors and conf.max_frame_bytes() >= DAPHNE_MAX_FRAME:
        errors.append(
            Error(
                "MESSAGING_MAX_BODY_BYTES is too close to daphne's 1 MiB frame limit: larger "
                "frames would be dropped without an error frame.",
                id="messaging.E002",
            )
        )
    for rate_name, burst_name in (
        ("MESSAGING_SEND_RATE", "MESSAGING_SEND_BURST"),
        ("MESSAGING_USER_SEND_RATE", "MESSAGING_USER_SEND_BURST"),
        ("MESSAGING_PING_RATE", "MESSAGING_PING_BURST"),
    ):
        rate, burst = conf.get(rate_name), conf.get(burst_name)
        if rate is not None and (
            not isinstance(rate, int | float)
            or rate <= 0
            or not isinstance(burst, int | float)
            or burst < 1
        ):
            errors.append(
                Error(f"{rate_name} must be None or > 0, {burst_name} >= 1.", id="messaging.E003")
            )
    rooms, typing = conf.get("MESSAGING_MAX_ROOMS_PER_USER"), conf.get("MESSAGING_TYPING_INTERVAL")
    if rooms is not None and (not isinstance(rooms, int) or isinstance(rooms, bool) or rooms < 0):
        errors.append(
            Error("MESSAGING_MAX_ROOMS_PER_USER must be None or >= 0.", id="messaging.E005")
        )
    if typing is not None and (not isinstance(typing, int | float) or typing <= 0):
        errors.append(Error("MESSAGING_TYPING_INTERVAL must be None or > 0.", id="messaging.E006"))
    return errors


# The send path's hand-written statements use INSERT ... ON CONFLICT ... RETURNING.
SQLITE_MIN = (3, 35)


@register()
def check_database(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """
    Reject an SQLite library too old for the statements of messaging.services.
    """
    from django.db import connections

    errors = []
    for conn in connections.all():
        if conn.vendor == "sqlite":
            import sqlite3

            if sqlite3.sqlite_version_info < SQLITE_MIN:
                errors.append(
                    Error(
                        f"SQLite {sqlite3.sqlite_version} is too old: {SQLITE_MIN[0]}."
                        f"{SQLITE_MIN[1]} or later is needed (INSERT ... RETURNING).",
                        id="messaging.E004",
                    )
                )
    return errors


@register()
def check_metrics(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """
    Reject a METRICS_ALLOWED_IPS entry that is neither an address nor a network.
    """
    try:
        metrics.allowed_networks()
    except ValueError as exc:
        return [Error(f"MESSAGING_METRICS_ALLOWED_IPS: {exc}", id="messaging.E007")]
    return []


@register()
def check_server_api(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """
    Reject a server API token anyone could guess, and a sender label no message could carry.
    """
    errors = []
    token = conf.get("MESSAGING_SERVER_API_TOKEN")
    if token is not None and (not isinstance(token, str) or len(token) < SERVER_TOKEN_MIN):
        # A guessable token opens publishing to every user and room.
        errors.append(
            Error(
                f"MESSAGING_SERVER_API_TOKEN must be None (the server API off) or a string of at"
                f" least {SERVER_TOKEN_MIN} characters.",
                id="messaging.E008",
            )
        )
    sender = conf.get("MESSAGING_SERVER_SENDER")
    if not isinstance(sender, str) or not 1 <= len(sender) <= 100:
        errors.append(
            Error(
                "MESSAGING_SERVER_SENDER must be a string of 1 to 100 characters.",
                id="messaging.E009",
            )
        )
    return errors
