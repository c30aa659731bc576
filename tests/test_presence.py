"""Presence: online while any tab has a socket, announced to room co-members, never queued."""

import pytest
from channels.db import database_sync_to_async

from messaging.models import Delivery, Room
from tests.conftest import connect_tab, new_client

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def share_room(*users):
    room = Room.objects.create(name="hall")
    room.members.add(*users)


async def test_first_tab_online_last_tab_offline(alice, bob):
    """Co-members see a user come online with its first tab and go offline with its last."""
    await share_room(alice, bob)
    b1, a1, a2 = await new_client(bob), await new_client(alice), await new_client(alice)
    tb = await connect_tab(bob, b1)
    assert await tb.nothing(), "a tab is not told about its own user"
    ta1 = await connect_tab(alice, a1)
    assert await tb.recv() == {"type": "presence", "user": "alice", "online": True}
    ta2 = await connect_tab(alice, a2)
    assert await tb.nothing(), "a second tab must not announce again"
    await ta1.disconnect()
    assert await tb.nothing(), "alice still has a tab open"
    await ta2.disconnect()
    assert await tb.recv() == {"type": "presence", "user": "alice", "online": False}
    assert not await database_sync_to_async(Delivery.objects.exists)(), "presence is never queued"
    await tb.disconnect()


async def test_new_tab_learns_who_is_online(alice, bob, carol):
    """A connecting tab gets presence frames for the co-members online now, after its replay."""
    await share_room(alice, bob)
    b1, a1 = await new_client(bob), await new_client(alice)
    await new_client(carol)  # not in the room: never mentioned
    tb = await connect_tab(bob, b1)
    ta = await connect_tab(alice, a1)
    assert await ta.recv() == {"type": "presence", "user": "bob", "online": True}
    assert await ta.nothing()
    await ta.disconnect()
    await tb.disconnect()


async def test_users_without_a_shared_room_see_nothing(alice, carol):
    """Presence goes only to users who share a room."""
    await share_room(alice)
    c1, a1 = await new_client(carol), await new_client(alice)
    tc = await connect_tab(carol, c1)
    ta = await connect_tab(alice, a1)
    assert await tc.nothing()
    await ta.disconnect()
    await tc.disconnect()
