"""System checks for the messaging app."""

from typing import Any

from django.core.checks import Error, register

from messaging import conf

# daphne drops frames over this size without a close frame, so the app's own limit must stay below.
DAPHNE_MAX_FRAME = 1024 * 1024


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
    for who, eid in (("", "messaging.E003"), ("USER_", "messaging.E004")):
        rate_name, burst_name = f"MESSAGING_{who}SEND_RATE", f"MESSAGING_{who}SEND_BURST"
        rate, burst = conf.get(rate_name), conf.get(burst_name)
        if rate is not None and (
            not isinstance(rate, int | float)
            or rate <= 0
            or not isinstance(burst, int | float)
            or burst < 1
        ):
            errors.append(Error(f"{rate_name} must be None or > 0, {burst_name} >= 1.", id=eid))
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
