"""
Presence: a user is online while any of its clients has a socket, on any process. Announced to
the other users who share a room with it; never queued.
"""

from typing import Any

from django.contrib.auth import get_user_model

from clients.models import Client, user_group
from clients.push import group_send_now
from messaging.models import Room


def audience(user_id: int) -> set[int]:
    """
    The ids of the users who see `user_id`'s presence: its room co-members.
    """
    rooms = Room.objects.filter(members=user_id)
    peers = set(get_user_model().objects.filter(chat_rooms__in=rooms).values_list("id", flat=True))
    peers.discard(user_id)
    return peers


def announce_presence(sender: Any = None, *, user_id: int, online: bool, **kwargs: Any) -> None:
    """
    Receiver of clients' presence_changed: send a presence frame to the user's audience.
    """
    name = get_user_model().objects.filter(pk=user_id).values_list("username", flat=True).first()
    if name is None:
        return
    event = {"type": "messaging.presence", "user": name, "online": online}
    group_send_now([(user_group(uid), event) for uid in sorted(audience(user_id))])


def online_peers(user_id: int) -> list[str]:
    """
    The names of the users in the audience of `user_id` that are online now, by name.
    """
    online = (
        Client.objects.filter(user_id__in=audience(user_id))
        .connected()
        .values_list("user__username", flat=True)
        .distinct()
    )
    return sorted(online)
