"""
Deliberately broken builds, to show that the chaos checker catches what the guarantees prevent.

daphne serves `chaos.broken:application` with CHAOS_BREAK set to one of:

- `dedup`: a retried `client_msg_id` is stored again as a new message (no duplicate detection),
  as a server without the dedup lookup and unique constraint would do.
- `store-before-send`: a message reaches only the tabs connected at that moment; nothing is
  queued for the others, as a plain Channels group broadcast (send, no store) would do.

Never served by anything but the chaos tool and its tests.
"""

import logging
import os
import uuid

from django.db.models import F

from chaos.run import BREAKS
from chatproject.asgi import application
from clients.models import Client
from messaging import services
from messaging.models import Delivery

logger = logging.getLogger(__name__)

__all__ = ["BREAKS", "application"]

_store = services._store


def _store_without_dedup(owner, sender_client, cmid, *args):
    # A fresh suffix keeps the unique constraint from catching the retry.
    return _store(owner, sender_client, f"{cmid}~{uuid.uuid4().hex[:8]}", *args)


def _store_for_live_tabs_only(owner, sender_client, cmid, *args):
    result = _store(owner, sender_client, cmid, *args)
    if not result.duplicate:
        # Still inside the send's transaction, under its row locks: undo the queue entries of
        # every tab without a socket, as if the message had only been broadcast.
        offline = Delivery.objects.filter(
            message_id=result.id, client__in=Client.objects.disconnected()
        ).exclude(client_id=sender_client)
        dropped = list(offline.values_list("client_id", flat=True))
        offline.delete()
        Client.objects.filter(id__in=dropped).update(head=F("head") - 1)
    return result


_break = os.environ.get("CHAOS_BREAK", "")
if _break == "dedup":
    services._existing_id = lambda sender_client, cmid: None  # type: ignore[assignment]
    services._store = _store_without_dedup
elif _break == "store-before-send":
    services._store = _store_for_live_tabs_only
else:
    raise RuntimeError(f"CHAOS_BREAK must be one of {BREAKS}, not {_break!r}")
logger.warning("BROKEN BUILD: %s is switched off", _break)
