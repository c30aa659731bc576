"""Message history retention, run with the periodic cleanup."""

import logging
from datetime import datetime, timedelta

from django.db.models import Exists, OuterRef
from django.utils import timezone

from messaging import conf
from messaging.models import Delivery, Message

logger = logging.getLogger(__name__)


def prune_history(now: datetime | None = None, batch_size: int = 1000) -> str:
    """
    Delete messages older than MESSAGING_HISTORY_RETENTION that no client's queue holds any
    more (a queued message is deleted only by its clients' acks). Returns a summary, empty
    when retention is off.
    """
    retention = conf.get("MESSAGING_HISTORY_RETENTION")
    if retention is None:
        return ""
    cutoff = (now or timezone.now()) - timedelta(seconds=retention)
    old = Message.objects.filter(created_at__lt=cutoff).exclude(
        Exists(Delivery.objects.filter(message=OuterRef("pk")))
    )
    removed = 0
    while True:
        ids = list(old.order_by("id").values_list("id", flat=True)[:batch_size])
        if not ids:
            break
        # Checked again in the delete: a message cannot gain deliveries, only lose them.
        removed += old.filter(id__in=ids).delete()[0]
    if removed:
        logger.info("history retention removed %d message(s) older than %s", removed, cutoff)
    return f"removed {removed} message(s) older than {retention:g}s with no queued deliveries"
