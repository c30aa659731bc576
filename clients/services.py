"""
The tab lifecycle: register, authorize, attach to and detach from sockets, close, delete, clean up.

Both transports (the WebSocket consumer and the HTTP API) call these; no lifecycle rule lives in
either of them.
"""

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction
from django.db.models import Case, Value, When
from django.utils import timezone

from clients import conf
from clients.errors import Forbidden, NotAuthenticated, NotFound, Superseded
from clients.models import Client, client_group
from clients.process import PROCESS_ID
from clients.push import group_send_after_commit
from clients.signals import presence_changed

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
    Create a new client (tab) for the logged-in user, with an empty queue; past
    CLIENTS_MAX_PER_USER the user's least recently seen clients are evicted to make room.
    """
    owner = require_user(user)
    limit = conf.get("CLIENTS_MAX_PER_USER")
    with transaction.atomic():
        if limit is not None:
            # Under the user lock (as attach takes it): concurrent registers of one user are
            # counted one after the other, so none of them overshoots the bound.
            _lock_user(owner.pk)
            _evict_for_one_more(owner.pk, int(limit))
        client = Client.objects.create(user_id=owner.pk)
    logger.info("client %s registered for user %s", client.id, owner.pk)
    return client


def _evict_for_one_more(user_id: int, limit: int) -> None:
    # Refusing the new tab would break the tab the user is looking at, so an old one goes:
    # closing tabs first, then tabs without a socket (a 4404 when they come back makes them
    # register again), and only then live ones, least recently seen first. A live tab evicted
    # is closed with 4429, on which the browser client waits for its user instead of
    # registering again at once: two live tabs past the bound would otherwise evict each
    # other without end.
    mine = Client.objects.filter(user_id=user_id)
    excess = mine.count() - max(1, limit) + 1
    if excess <= 0:
        return
    rank = Case(
        When(closing_at__isnull=False, then=Value(0)),
        When(channel_name="", then=Value(1)),
        default=Value(2),
    )
    victims = list(
        mine.annotate(rank=rank)
        .order_by("rank", "last_seen_at", "id")
        .values_list("id", flat=True)[:excess]
    )
    delete_clients(victims, by=f"eviction (over CLIENTS_MAX_PER_USER={limit})", evicted=True)


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


def lock_user(user_id: int) -> None:
    """
    Lock the user's row until the transaction ends: per-user bounds (clients, rooms) are
    counted and enforced under it, one request after the other.
    """
    _lock_user(user_id)


def _lock_user(user_id: int) -> None:
    # Serialises attach/detach per user, so "first socket" and "last socket" are decided once
    # even when two tabs connect or leave at the same moment on different processes. NO KEY:
    # a plain FOR UPDATE would also block the FOR KEY SHARE that a concurrent send's message
    # insert takes on the user row (its foreign key) while that send holds the client rows this
    # transaction waits for: a deadlock, and a failed send.
    users = get_user_model().objects.select_for_update(no_key=True).filter(pk=user_id)
    list(users.values_list("pk"))


def _connected_elsewhere(user_id: int, client_id: uuid.UUID | str) -> bool:
    return Client.objects.filter(user_id=user_id).connected().exclude(pk=client_id).exists()


def _announce(user_id: int, online: bool) -> None:
    transaction.on_commit(
        lambda: presence_changed.send(sender=Client, user_id=user_id, online=online)
    )


def attach(
    user: AnyUser | None, client_id: object, channel_name: str, attempt: int | None = None
) -> Attachment:
    """
    Make `channel_name` the socket of the client; return the channel it replaces (or "").

    Connecting again also cancels a pending close: a reload is not a close. `attempt` is the
    tab's own count of its connection attempts (the `conn` query parameter): an attempt the tab
    gave up on (it timed out, or its connection was cut) can still reach the server, or finish
    attaching, after the tab's next one. It must not supersede that newer socket: an attempt
    below the highest one seen is refused (Superseded, 4409). Without `attempt`, the last
    socket to attach wins.
    """
    with transaction.atomic():
        client = get_own_client(user, client_id, for_update=False)
        _lock_user(client.user_id)
        locked = Client.objects.select_for_update().filter(pk=client.pk).first()
        if locked is None:
            raise NotFound("no such client", code="unknown_client")
        client = locked
        previous = client.channel_name
        if attempt is not None:
            if attempt < client.last_attempt:
                raise Superseded(
                    f"connection attempt {attempt} is older than attempt {client.last_attempt}"
                )
            client.last_attempt = attempt
        if not previous and not _connected_elsewhere(client.user_id, client.pk):
            _announce(client.user_id, True)
        now = timezone.now()
        client.channel_name = channel_name
        client.server = PROCESS_ID
        client.connected_at = now
        client.last_seen_at = now
        client.closing_at = None
        client.save(
            update_fields=[
                "channel_name",
                "server",
                "connected_at",
                "last_seen_at",
                "closing_at",
                "last_attempt",
            ]
        )
    return Attachment(client=client, previous_channel=previous if previous != channel_name else "")


def detach(client_id: uuid.UUID | str, channel_name: str) -> bool:
    """
    Mark the client disconnected, but only if `channel_name` is still its socket: a late
    disconnect of a superseded socket must not erase the new one.
    """
    user_id = Client.objects.filter(pk=client_id).values_list("user_id", flat=True).first()
    if user_id is None:
        return False
    with transaction.atomic():
        _lock_user(user_id)
        updated = Client.objects.filter(pk=client_id, channel_name=channel_name).update(
            channel_name="", server="", last_seen_at=timezone.now()
        )
        if updated and not _connected_elsewhere(user_id, client_id):
            _announce(user_id, False)
    return bool(updated)


def mark_closing(user: AnyUser | None, client_id: object, attempt: int | None = None) -> bool:
    """
    The tab is probably closing (pagehide): delete it after the grace period unless it
    connects again. `attempt` is the connection attempt of the page that sent the beacon: a
    beacon that arrives after a newer attempt attached (the reloaded page) is ignored. Returns
    whether the client was marked.
    """
    client = get_own_client(user, client_id)
    now = timezone.now()
    rows = Client.objects.filter(pk=client.pk)
    if attempt is not None:
        # Decided in the UPDATE itself, against attach's row lock: a beacon must never outlive
        # the socket that follows it, or a later disconnect would delete a live tab's queue.
        rows = rows.filter(last_attempt__lte=attempt)
    marked = bool(rows.update(closing_at=now, last_seen_at=now))
    if not marked:
        logger.info("stale close beacon of client %s (attempt %s) ignored", client.pk, attempt)
    return marked


def delete_client(user: AnyUser | None, client_id: object) -> None:
    """
    Delete the client and its queue now; a socket attached to it is closed with 4404.
    """
    with transaction.atomic():
        client = get_own_client(user, client_id, for_update=True)
        delete_clients([client.pk], by="its user")


def kick_clients(client_ids: list) -> int:
    """
    Close the sockets of these clients (an operator's action); the tabs reconnect and resume.
    """
    ids = list(Client.objects.filter(id__in=client_ids).connected().values_list("id", flat=True))
    group_send_after_commit([(client_group(cid), {"type": "clients.kick"}) for cid in ids])
    return len(ids)


def delete_clients(client_ids: list, *, by: str = "an operator", evicted: bool = False) -> int:
    """
    Delete these clients and their queues now; open sockets close with 4404 (4429 if
    `evicted`: the user opened more tabs than the bound), and users left without a socket are
    announced offline.
    """
    with transaction.atomic():
        rows = list(
            Client.objects.select_for_update()
            .filter(id__in=client_ids)
            .order_by("id")
            .values_list("id", "user_id", "channel_name")
        )
        for client_id, user_id, channel in rows:
            if channel and not _connected_elsewhere(user_id, client_id):
                _announce(user_id, False)
        Client.objects.filter(id__in=[r[0] for r in rows]).delete()
        event = {"type": "clients.deleted", "evicted": evicted}
        group_send_after_commit([(client_group(r[0]), event) for r in rows])
    logger.info("%d client(s) deleted by %s", len(rows), by)
    return len(rows)
