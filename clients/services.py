"""
The tab lifecycle: register, authorize, attach to and detach from sockets, close, delete, clean up.

Both transports (the WebSocket consumer and the HTTP API) call these; no lifecycle rule lives in
either of them.
"""

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from clients import conf
from clients.errors import Forbidden, NotAuthenticated, NotFound
from clients.models import Client, client_group
from clients.push import group_send_after_commit

logger = logging.getLogger(__name__)

AnyUser = AbstractBaseUser | AnonymousUser


def require_user(user: AnyUser | None) -> AbstractBaseUser:
    """
    Return `user` if logged in, else raise NotAuthenticated.
    """
    if user is None or not user.is_authenticated:
        raise NotAuthenticated("log in first")
    return user  # type: ignore[return-value]


def parse_client_id(raw: object) -> uuid.UUID:
    """
    Parse a client id; anything that is not a UUID names no client, so it is NotFound.
    """
    if isinstance(raw, uuid.UUID):
        return raw
    try:
        return uuid.UUID(str(raw))
    except (ValueError, TypeError, AttributeError):
        raise NotFound("no such client", code="unknown_client") from None


def get_own_client(user: AnyUser | None, client_id: object, *, for_update: bool = False) -> Client:
    """
    Return the client `client_id` of `user`: NotAuthenticated, NotFound or Forbidden otherwise.
    """
    owner = require_user(user)
    pk = parse_client_id(client_id)
    qs = Client.objects.select_for_update() if for_update else Client.objects
    client = qs.filter(pk=pk).first()
    if client is None:
        raise NotFound("no such client", code="unknown_client")
    if client.user_id != owner.pk:
        raise Forbidden("this client belongs to another user", code="not_your_client")
    return client


def register_client(user: AnyUser | None) -> Client:
    """
    Create a new client (tab) for the logged-in user, with an empty queue.
    """
    owner = require_user(user)
    client = Client.objects.create(user_id=owner.pk)
    logger.info("client %s registered for user %s", client.id, owner.pk)
    return client


def touch(client: Client) -> None:
    """
    Record activity over HTTP, writing at most once per CLIENTS_TOUCH_INTERVAL.
    """
    now = timezone.now()
    if now - client.last_seen_at >= timedelta(seconds=conf.get("CLIENTS_TOUCH_INTERVAL")):
        Client.objects.filter(pk=client.pk).update(last_seen_at=now)
        client.last_seen_at = now


@dataclass
class Attachment:
    """
    The result of attaching a socket to a client.
    """

    client: Client
    previous_channel: str


def attach(user: AnyUser | None, client_id: object, channel_name: str) -> Attachment:
    """
    Make `channel_name` the socket of the client; return the channel it replaces (or "").

    Connecting again also cancels a pending close: a reload is not a close.
    """
    with transaction.atomic():
        client = get_own_client(user, client_id, for_update=True)
        previous = client.channel_name
        now = timezone.now()
        client.channel_name = channel_name
        client.connected_at = now
        client.last_seen_at = now
        client.closing_at = None
        client.save(update_fields=["channel_name", "connected_at", "last_seen_at", "closing_at"])
    return Attachment(client=client, previous_channel=previous if previous != channel_name else "")


def detach(client_id: uuid.UUID | str, channel_name: str) -> bool:
    """
    Mark the client disconnected, but only if `channel_name` is still its socket: a late
    disconnect of a superseded socket must not erase the new one.
    """
    updated = Client.objects.filter(pk=client_id, channel_name=channel_name).update(
        channel_name="", last_seen_at=timezone.now()
    )
    return bool(updated)


def mark_closing(user: AnyUser | None, client_id: object) -> None:
    """
    The tab is probably closing (pagehide): delete it after the grace period unless it
    connects again.
    """
    client = get_own_client(user, client_id)
    Client.objects.filter(pk=client.pk).update(
        closing_at=timezone.now(), last_seen_at=timezone.now()
    )


def delete_client(user: AnyUser | None, client_id: object) -> None:
    """
    Delete the client and its queue now; a socket attached to it is closed with 4404.
    """
    with transaction.atomic():
        client = get_own_client(user, client_id, for_update=True)
        client.delete()
        group_send_after_commit([(client_group(client_id), {"type": "clients.deleted"})])
    logger.info("client %s deleted by its user", client_id)


@dataclass
class CleanupResult:
    """
    What a cleanup run removed (or, with dry_run, would remove).
    """

    stale: list[uuid.UUID] = field(default_factory=list)
    closed: list[uuid.UUID] = field(default_factory=list)
    dry_run: bool = False

    @property
    def total(self) -> int:
        """
        The number of clients removed.
        """
        return len(self.stale) + len(self.closed)


def cleanup_q(now: datetime, stale_after: float | None = None) -> tuple[Q, Q]:
    """
    The filters for stale clients and for closing clients past their grace period.
    """
    stale_after = conf.get("CLIENTS_STALE_AFTER") if stale_after is None else stale_after
    grace = conf.get("CLIENTS_CLOSE_GRACE")
    disconnected = Q(channel_name="")
    stale = disconnected & Q(last_seen_at__lt=now - timedelta(seconds=stale_after))
    closed = disconnected & Q(
        closing_at__isnull=False, closing_at__lt=now - timedelta(seconds=grace)
    )
    return stale, closed


def cleanup_clients(
    *,
    now: datetime | None = None,
    stale_after: float | None = None,
    dry_run: bool = False,
    batch_size: int = 500,
) -> CleanupResult:
    """
    Delete stale clients and closing clients past their grace period, with their queues.

    A connected client is never deleted: the condition is checked again in each DELETE, so a tab
    that connects between the look-up and the delete survives. Safe to run from several processes.
    """
    now = now or timezone.now()
    stale_q, closed_q = cleanup_q(now, stale_after)
    result = CleanupResult(dry_run=dry_run)
    for q, bucket in ((closed_q, result.closed), (stale_q & ~closed_q, result.stale)):
        ids = list(Client.objects.filter(q).order_by("id").values_list("id", flat=True))
        if dry_run:
            bucket.extend(ids)
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
                    Client.objects.filter(id__in=doomed).delete()
            bucket.extend(doomed)
    if result.total and not dry_run:
        logger.info(
            "cleanup removed %d client(s): %d stale, %d closed",
            result.total,
            len(result.stale),
            len(result.closed),
        )
    return result


def describe(client: Client) -> dict:
    """
    The HTTP representation of a newly registered client.
    """
    return {"client_id": str(client.id), "head": client.head}
