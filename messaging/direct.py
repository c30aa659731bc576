"""
Direct-message history: the conversations of a user and the messages of one of them, and the
server's messages to the user (its notices).

A tab's queue is not the only copy of a direct message: past the queue bound (or for a new tab)
the tab reloads them from here, as it reloads rooms from their history. Every query is relative
to the requesting user, so nobody can read a conversation that is not theirs.
"""

import logging

from django.contrib.auth import get_user_model
from django.db.models import Max

from clients.errors import NotFound
from clients.services import AnyUser, require_user
from messaging import validation
from messaging.models import Message

logger = logging.getLogger(__name__)


def conversations(user: AnyUser | None, limit: int) -> list[dict]:
    """
    The users that `user` has direct messages with (themselves included, for notes to self),
    most recent conversation first: `[{"user": name, "last_id": id}]`, at most `limit`.
    """
    owner = require_user(user)
    direct = Message.objects.filter(room__isnull=True).order_by()
    last: dict[int, int] = {}
    for partner, last_id in [
        *direct.filter(sender=owner.pk).values_list("to_user").annotate(last=Max("id")),
        # (The server's messages have no sender: they are the notices, below.)
        *direct.filter(to_user=owner.pk, sender__isnull=False)
        .values_list("sender")
        .annotate(last=Max("id")),
    ]:
        last[partner] = max(last_id, last.get(partner, 0))
    newest = sorted(last.items(), key=lambda item: item[1], reverse=True)[:limit]
    User = get_user_model()
    names = dict(
        User.objects.filter(pk__in=[pk for pk, _ in newest]).values_list("pk", User.USERNAME_FIELD)
    )
    return [{"user": names[pk], "last_id": last_id} for pk, last_id in newest if pk in names]


def direct_history(
    user: AnyUser | None, name: object, before: int | None, limit: int
) -> list[tuple[int, str]]:
    """
    Up to `limit` direct messages between `user` and the user `name` (both directions) with
    id < `before` (all when None), newest last.
    """
    owner = require_user(user)
    clean = validation.clean_text(name, "user", max_length=validation.MAX_NAME)
    User = get_user_model()
    partner = User.objects.filter(**{User.USERNAME_FIELD: clean}).values_list("pk", flat=True)
    partner_pk = partner.first()
    if partner_pk is None:
        raise NotFound(f"no user named {clean!r}", code="unknown_user")
    # One query per direction, each a backward range of message_direct_idx, merged here: an OR
    # of the two directions could have the planner walk the whole table by id instead.
    rows: set[tuple[int, str]] = set()
    for sender, recipient in {(owner.pk, partner_pk), (partner_pk, owner.pk)}:
        qs = Message.objects.filter(to_user=recipient, sender=sender)
        if before is not None:
            qs = qs.filter(id__lt=before)
        rows.update(qs.order_by("-id").values_list("id", "wire")[:limit])
    return sorted(rows)[-limit:]


def notices(user: AnyUser | None, before: int | None, limit: int) -> list[tuple[int, str]]:
    """
    Up to `limit` messages the server published to `user` (not to a room) with id < `before`
    (all when None), newest last: what a tab past its queue bound or opened later reloads.
    """
    owner = require_user(user)
    # A backward range of message_direct_idx (to_user, sender IS NULL, id).
    qs = Message.objects.filter(to_user=owner.pk, sender__isnull=True)
    if before is not None:
        qs = qs.filter(id__lt=before)
    rows = list(qs.order_by("-id").values_list("id", "wire")[:limit])
    rows.reverse()
    return rows
