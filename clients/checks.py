"""System checks for the clients app."""

from typing import Any

from django.core.checks import Error, register

from clients import conf


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """
    Reject timeouts that would delete live tabs or never delete dead ones.
    """
    errors = []
    for name in (
        "CLIENTS_STALE_AFTER",
        "CLIENTS_CLOSE_GRACE",
        "CLIENTS_CLEANUP_INTERVAL",
        "CLIENTS_SESSION_CHECK_INTERVAL",
    ):
        value = conf.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            errors.append(
                Error(f"{name} must be a number of seconds >= 0, not {value!r}.", id="clients.E001")
            )
    limit = conf.get("CLIENTS_MAX_PER_USER")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        errors.append(
            Error(f"CLIENTS_MAX_PER_USER must be None or >= 1, not {limit!r}.", id="clients.E002")
        )
    return errors
