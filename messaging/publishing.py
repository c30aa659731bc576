"""
Messages from the server: the host application's publish (docs/publish.md).

A publish is a send without a sending tab. It goes through the send path of the tabs
(services.send_many), so it has their guarantees: stored with one delivery per target client,
pushed after the commit, deleted by each client's ack, caught up over HTTP or a later socket,
bounded per client. Inside the caller's `transaction.atomic()` it joins that transaction: the
message and its deliveries exist if and only if the caller's work commits, and the pushes go out
on that commit.
"""

import hashlib
import logging
import uuid
from typing import Any

from channels.db import database_sync_to_async
from django.contrib.auth.models import AbstractBaseUser

from clients.errors import Malformed
from messaging import conf, services, validation
from messaging.models import SERVER_CLIENT, Room

logger = logging.getLogger(__name__)

# The longest key and sender label (the key is stored as a client_msg_id).
MAX_KEY = 100
MAX_SENDER = 100


def target_of(to: Any) -> tuple[str, str]:
    """
    A publish target as (kind, name): a user or a Room instance, a protocol `to` object
    ({"user": name} or {"room": name}), or the command line's "user:NAME" / "room:NAME".
    """
    if isinstance(to, AbstractBaseUser):
        return "user", to.get_username()
    if isinstance(to, Room):
        return "room", to.name
    if isinstance(to, str):
        kind, sep, name = to.partition(":")
        if not sep or kind not in ("user", "room"):
            raise Malformed(f"target must be user:NAME or room:NAME, not {to!r}", code="invalid_to")
        to = {kind: name}
    return validation.target(to)


def publish_request(
    to: Any, body: Any, *, key: str | None = None, sender: str | None = None
) -> services.SendRequest:
    """
    A validated publish, ready for services.send_many (errors raised as in a tab's send).
    """
    kind, name = target_of(to)
    body_text = validation.body_json(body)
    if key is None:
        # Nothing to retry by: a key of its own, unique (a caller's key could only meet it by
        # copying it).
        client_msg_id = f"auto:{uuid.uuid4().hex}"
    else:
        key = validation.clean_text(key, "key", max_length=MAX_KEY)
        # A key names one message to one target: the same key for another target (an order id
        # used for its buyer and for its seller) is another message, not a duplicate.
        scoped = hashlib.sha256(f"{kind}\0{name}\0{key}".encode()).hexdigest()[:48]
        client_msg_id = f"key:{scoped}"
    label = conf.get("MESSAGING_SERVER_SENDER") if sender is None else sender
    label = validation.clean_text(label, "sender", max_length=MAX_SENDER)
    return services.SendRequest(
        owner=None,
        client_id=SERVER_CLIENT,
        client_msg_id=client_msg_id,
        kind=kind,
        name=name,
        body_text=body_text,
        server=label,
    )


def publish(
    to: Any, body: Any, *, key: str | None = None, sender: str | None = None
) -> services.SendResult:
    """
    Send `body` (any JSON value) from the server to every client of a user or every member of a
    room; `key` makes a retry store nothing new (the stored message is answered, duplicate=True).
    Joins the caller's transaction if there is one; raises clients.errors.ServiceError (NotFound
    for an unknown user or room, Malformed, TooLarge) for a refused publish.
    """
    request = publish_request(to, body, key=key, sender=sender)
    (result,) = services.send_many([request])
    if isinstance(result, Exception):
        raise result
    if not result.duplicate:
        logger.info("published message %s to %s %s", result.id, request.kind, request.name)
    return result


async def apublish(
    to: Any, body: Any, *, key: str | None = None, sender: str | None = None
) -> services.SendResult:
    """
    `publish` from async code, in a transaction of its own (on a database thread).
    """
    return await database_sync_to_async(publish)(to, body, key=key, sender=sender)
