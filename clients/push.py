"""
Real-time notifications through the channel layer, sent only after the transaction commits.

Real time is a bonus: the database is the source of truth, so a lost or failed push costs latency
(the tab finds the delivery on its next read), never a message.
"""

import logging
from collections.abc import Iterable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger(__name__)

GroupEvent = tuple[str, dict]


def group_send_after_commit(events: Iterable[GroupEvent]) -> None:
    """
    Send each (group, event) once the current transaction commits (at once outside one).
    """
    batch = list(events)
    if batch:
        transaction.on_commit(lambda: group_send_now(batch))


def group_send_now(events: list[GroupEvent]) -> None:
    """
    Send each (group, event) now, from synchronous code; failures are logged, never raised.
    """
    layer = get_channel_layer()
    if layer is None or not events:
        return
    try:
        async_to_sync(_group_send_all)(layer, events)
    except Exception:
        logger.exception("channel layer push of %d event(s) failed", len(events))


async def _group_send_all(layer, events: list[GroupEvent]) -> None:
    for group, event in events:
        await layer.group_send(group, event)
