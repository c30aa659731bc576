"""
Deliberately broken builds, to show that the chaos checker catches what the guarantees prevent.

daphne serves `chaos.broken:application` with CHAOS_BREAK set to one of:

- `dedup`: a retried `client_msg_id` is stored again as a new message (no duplicate detection),
  as a server without the dedup lookup and unique constraint would do.
- `store-before-send`: a message reaches only the tabs connected at that moment; nothing is
  queued for the others, as a plain Channels group broadcast (send, no store) would do.

Never served by anything but the chaos tool and its tests.
"""

import dataclasses
import logging
import os
import uuid
from collections import Counter

from django.db.models import F

from chaos.run import BREAKS
from chatproject.asgi import application
from clients.models import Client
from messaging import services
from messaging.models import Delivery

logger = logging.getLogger(__name__)

__all__ = ["BREAKS", "application"]

_store = services._store


def _store_without_dedup(batch):
    # A fresh suffix keeps the unique constraint from catching the retry.
    return _store(
        [
            dataclasses.replace(r, client_msg_id=f"{r.client_msg_id}~{uuid.uuid4().hex[:8]}")
            for r in batch
        ]
    )


def _store_for_live_tabs_only(batch):
    results = _store(batch)
    stored = [r.id for r in results if isinstance(r, services.SendResult) and not r.duplicate]
    if stored:
        # Still inside the send's transaction, under its row locks: undo the queue entries of
        # every tab without a socket, as if the messages had only been broadcast (they are the
        # last ones of each such tab, so its head moves back by their number).
        offline = Delivery.objects.filter(
            message_id__in=stored, client__in=Client.objects.disconnected()
        ).exclude(client_id__in=[r.client_id for r in batch])
        dropped = Counter(offline.values_list("client_id", flat=True))
        offline.delete()
        for client_id, n in dropped.items():
            Client.objects.filter(id=client_id).update(head=F("head") - n)
    return results


_break = os.environ.get("CHAOS_BREAK", "")
if _break == "dedup":
    services._existing_ids = lambda requests: {}  # type: ignore[assignment]
    services._store = _store_without_dedup
elif _break == "store-before-send":
    services._store = _store_for_live_tabs_only
else:
    raise RuntimeError(f"CHAOS_BREAK must be one of {BREAKS}, not {_break!r}")
logger.warning("BROKEN BUILD: %s is switched off", _break)
