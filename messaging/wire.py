"""
The wire format: parsing client JSON strictly and building the protocol's JSON objects.

Stored messages keep their message object as JSON text (`Message.wire`), so frames and
HTTP answers are assembled from text without decoding and re-encoding bodies.
"""

import json
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from clients.errors import Malformed


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Deeper JSON is refused before parsing: json.loads would hit Python's recursion limit, and a
# caught RecursionError can leave CPython 3.11's AST recursion counter corrupted (cpython#106905),
# crashing a later unrelated compile in the same process.
MAX_DEPTH = 512
# A string token runs to its closing quote or, unterminated, to the end of the text (json.loads
# fails there anyway). Were the closing quote required, every escaped quote of an unterminated
# string would start a new failing match to the end: quadratic, minutes of blocked event loop
# for one 100 KB frame.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)


def _too_deep(text: str) -> bool:
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif token in "]}":
            depth -= 1
    return False


def parse_json(text: str | bytes) -> Any:
    """
    Parse client JSON strictly (no NaN or Infinity, at most MAX_DEPTH levels); raise Malformed
    on anything else.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if _too_deep(text):
            raise Malformed(f"JSON nested deeper than {MAX_DEPTH} levels", code="malformed_json")
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise Malformed("JSON nested too deeply", code="malformed_json") from None
    except (ValueError, TypeError) as exc:
        raise Malformed(f"not valid JSON: {exc}", code="malformed_json") from None


def dumps(value: Any) -> str:
    """
    Compact, ASCII-only JSON text (safe in every database column and every frame).
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def iso_utc(moment: datetime) -> str:
    """
    ISO 8601 in UTC with a Z suffix.
    """
    return moment.isoformat().replace("+00:00", "Z")


def message_tail(
    *,
    sender: str | None,
    client_id: str | None,
    to: dict,
    body_json: str,
    created: datetime,
    server: str | None = None,
) -> str:
    """
    The protocol's message object without its id, as JSON text ending in "}" and starting with
    ',"from"'; the id is known only after the insert and is put in front by `message_json`.
    A message published by the server has `"server": label` in its `from` (user and client null).
    """
    sent_by: dict[str, Any] = {"user": sender, "client_id": client_id}
    if server is not None:
        sent_by["server"] = server
    head = dumps({"from": sent_by, "to": to})
    return f',{head[1:-1]},"body":{body_json},"created":"{iso_utc(created)}"}}'


def message_json(message_id: int, tail: str) -> str:
    """
    The full message object as JSON text.
    """
    return f'{{"id":{int(message_id)}{tail}'


def delivery_frame(seq: int, message_id: int, tail: str) -> str:
    """
    The `delivery` WebSocket frame of one queue entry.
    """
    return f'{{"type":"delivery","seq":{int(seq)},"message":{message_json(message_id, tail)}}}'


def deliveries_json(rows: Iterable[tuple[int, int, str]], head: int, **extra: Any) -> str:
    """
    The HTTP answer `{"deliveries": [...], "head": H}` of (seq, message id, tail) rows.
    """
    items = ",".join(
        f'{{"seq":{int(seq)},"message":{message_json(mid, tail)}}}' for seq, mid, tail in rows
    )
    more = "".join(f",{dumps(k)}:{dumps(v)}" for k, v in extra.items())
    return f'{{"deliveries":[{items}],"head":{int(head)}{more}}}'


def messages_json(rows: Iterable[tuple[int, str]]) -> str:
    """
    The HTTP answer `{"messages": [...]}` of (message id, tail) rows.
    """
    return '{"messages":[' + ",".join(message_json(mid, tail) for mid, tail in rows) + "]}"
