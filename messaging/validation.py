"""
Checks of what clients send, shared by the WebSocket consumer and the HTTP API.
"""

import json
import re
from typing import Any

from clients.errors import Malformed, TooLarge
from messaging import conf
from messaging.wire import dumps

# Every integer the protocol carries fits a signed 64-bit database column.
MAX_INT = 2**63 - 1
ROOM_NAME = re.compile(r"[\w.-]{1,64}")
MAX_NAME = 150


def int_value(raw: Any, name: str, *, minimum: int = 0) -> int:
    """
    A JSON integer field (not a bool, not a float) in [minimum, 2**63-1].
    """
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise Malformed(f"{name} must be an integer", code=f"invalid_{name}")
    if raw < minimum or raw > MAX_INT:
        raise Malformed(f"{name} must be between {minimum} and {MAX_INT}", code=f"invalid_{name}")
    return raw


def int_param(raw: str | None, name: str, *, default: int, minimum: int = 0) -> int:
    """
    A query-string integer in [minimum, 2**63-1], or `default` when absent.
    """
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise Malformed(f"{name} must be a non-negative integer", code=f"invalid_{name}")
    return int_value(int(raw), name, minimum=minimum)


def limit_param(raw: str | None) -> int:
    """
    A page size: default MESSAGING_PAGE_DEFAULT, at least 1, capped at MESSAGING_PAGE_MAX.
    """
    value = int_param(raw, "limit", default=conf.get("MESSAGING_PAGE_DEFAULT"), minimum=1)
    return min(value, conf.get("MESSAGING_PAGE_MAX"))


def clean_text(raw: Any, name: str, *, max_length: int) -> str:
    """
    A non-empty string of at most `max_length` characters, storable everywhere (no NUL, no lone
    surrogates).
    """
    if not isinstance(raw, str):
        raise Malformed(f"{name} must be a string", code=f"invalid_{name}")
    if not 1 <= len(raw) <= max_length:
        raise Malformed(f"{name} must have 1 to {max_length} characters", code=f"invalid_{name}")
    if "\x00" in raw:
        raise Malformed(f"{name} must not contain NUL", code=f"invalid_{name}")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise Malformed(f"{name} is not valid Unicode", code=f"invalid_{name}") from None
    return raw


def client_msg_id(raw: Any) -> str:
    """
    A client message id: a string of 1 to 100 characters.
    """
    return clean_text(raw, "client_msg_id", max_length=100)


def room_name(raw: Any) -> str:
    """
    A room name: 1 to 64 letters, digits, '_', '-' or '.'.
    """
    if not isinstance(raw, str) or not ROOM_NAME.fullmatch(raw):
        raise Malformed(
            "room name must be 1 to 64 letters, digits, '_', '-' or '.'", code="invalid_room"
        )
    return raw


def target(raw: Any) -> tuple[str, str]:
    """
    A `to` object: exactly one of {"user": name} or {"room": name}; returns (kind, name).
    """
    if not isinstance(raw, dict) or len(raw) != 1 or not ({"user", "room"} & raw.keys()):
        raise Malformed('to must be {"user": name} or {"room": name}', code="invalid_to")
    kind, name = next(iter(raw.items()))
    if kind == "room":
        return "room", room_name(name)
    return "user", clean_text(name, "to", max_length=MAX_NAME)


def body_json(raw: Any) -> str:
    """
    Encode a message body as ASCII JSON text, enforcing MESSAGING_MAX_BODY_BYTES on its compact
    UTF-8 size.
    """
    limit = conf.get("MESSAGING_MAX_BODY_BYTES")
    try:
        text = dumps(raw)
        # ASCII escapes are never shorter than UTF-8, so the exact size is needed only past it.
        if len(text) > limit:
            size = len(
                json.dumps(raw, separators=(",", ":"), ensure_ascii=False).encode(
                    "utf-8", "surrogatepass"
                )
            )
            if size > limit:
                raise TooLarge(f"body is {size} bytes; the limit is {limit}", code="body_too_large")
    except (ValueError, TypeError, RecursionError):
        raise Malformed("body must be a JSON value", code="invalid_body") from None
    return text
