"""
Forgetting tabs: stale clients, closing clients past their grace period, and sockets held by
server processes that died without saying so.
"""

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Q, Sum
from django.utils import timezone

from clients import conf
from clients.models import Client, ServerProcess
from clients.signals import presence_changed
from messaging import metrics

logger = logging.getLogger(__name__)


@dataclass
class CleanupResult:
    """
    What a cleanup run removed (or, with dry_run, would remove).
    """

    stale: list[uuid.UUID] = field(default_factory=list)
    closed: list[uuid.UUID] = field(default_factory=list)
    deliveries: int = 0
    healed: int = 0
    dead_processes: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def total(self) -> int:
        """
        The number of clients removed.
        """
        return len(self.stale) + len(self.closed)


def cleanup_filters(now: datetime, stale_after: float | None = None) -> tuple[Q, Q]:
    """
    The filters for stale clients and for closing clients past their grace period; both only
    ever match clients without a socket.
    """
    stale_after = conf.get("CLIENTS_STALE_AFTER") if stale_after is None else stale_after
    grace = conf.get("CLIENTS_CLOSE_GRACE")
    disconnected = Q(channel_name="")
    stale = disconnected & Q(last_seen_at__lt=now - timedelta(seconds=stale_after))
    closed = disconnected & Q(
        closing_at__isnull=False, closing_at__lt=now - timedelta(seconds=grace)
    )
    return stale, closed


def dead_processes(now: datetime) -> list[ServerProcess]:
    """
    Server processes whose heartbeat is older than CLIENTS_PROCESS_TIMEOUT.
    """
    cutoff = now - timedelta(seconds=conf.get("CLIENTS_PROCESS_TIMEOUT"))
    return list(ServerProcess.objects.filter(heartbeat_at__lt=cutoff).order_by("id"))


def heal_dead_processes(now: datetime, *, dry_run: bool = False) -> tuple[list[str], list]:
    """
    Mark the sockets of dead server processes disconnected (as of their last heartbeat) and
    forget those processes. Returns their ids and the (client id, user id) pairs detached.
    """
    dead = dead_processes(now)
    detached: list = []
    for process in dead:
        held = Client.objects.filter(server=process.id).connected()
        if dry_run:
            detached.extend(held.values_list("id", "user_id"))
            continue
        with transaction.atomic():
            pairs = list(held.select_for_update().order_by("id").values_list("id", "user_id"))
            Client.objects.filter(id__in=[cid for cid, _ in pairs], server=process.id).update(
                channel_name="", server="", last_seen_at=process.heartbeat_at
            )
            ServerProcess.objects.filter(pk=process.pk, heartbeat_at__lt=now).delete()
        detached.extend(pairs)
        for user_id in {uid for _, uid in pairs}:
            if not Client.objects.filter(user_id=user_id).connected().exists():
                presence_changed.send(sender=Client, user_id=user_id, online=False)
        logger.warning(
            "server process %s stopped heart-beating at %s; %d socket(s) marked disconnected",
            process.id,
            process.heartbeat_at.isoformat(),
            len(pairs),
        )
    return [p.id for p in dead], detached


@metrics.cleanup_counted
def cleanup_clients(
    *,
    now: datetime | None = None,
    stale_after: float | None = None,
    dry_run: bool = False,
    batch_size: int = 500,
) -> CleanupResult:
    """
    Delete stale clients and closing clients past their grace period, with their queues.

    A connected client is never deleted: the condition is checked again inside each delete's
    transaction, and rows another run is deleting are skipped, so concurrent runs do not
    conflict.
    """
    now = now or timezone.now()
    result = CleanupResult(dry_run=dry_run)
    result.dead_processes, detached = heal_dead_processes(now, dry_run=dry_run)
    result.healed = len(detached)
    stale_q, closed_q = cleanup_filters(now, stale_after)
    for q, bucket in ((closed_q, result.closed), (stale_q & ~closed_q, result.stale)):
        ids = list(Client.objects.filter(q).order_by("id").values_list("id", flat=True))
        if dry_run:
            bucket.extend(ids)
            result.deliveries += _queued(ids)
            continue
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            with transaction.atomic():
                doomed = list(
                    Client.objects.select_for_update(skip_locked=True)
                    .filter(q, id__in=chunk)
                    .order_by("id")
                    .values_list("id", flat=True)
                )
                if doomed:
                    result.deliveries += _queued(doomed)
                    Client.objects.filter(id__in=doomed).delete()
            bucket.extend(doomed)
    if result.total and not dry_run:
        logger.info(
            "cleanup removed %d client(s) (%d stale, %d closed) and %d queued deliveries",
            result.total,
            len(result.stale),
            len(result.closed),
            result.deliveries,
        )
    return result


def _queued(ids: list) -> int:
    totals = Client.objects.filter(id__in=ids).aggregate(head=Sum("head"), acked=Sum("acked_seq"))
    return (totals["head"] or 0) - (totals["acked"] or 0)
