"""manage.py seed_demo: demo users and a room for a local development server."""

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from messaging.models import Room

DEMO_USERS = [("admin", True), ("alice", False), ("bob", False)]


class Command(BaseCommand):
    """
    Create the demo accounts (password = user name) and a "lobby" room, unless they exist.
    """

    help = (
        "Create demo users admin (superuser), alice and bob, each with their user name as "
        "password, and a room 'lobby' with all of them. Existing users are left untouched. "
        "For local development only."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        created = []
        for name, is_admin in DEMO_USERS:
            if User.objects.filter(username=name).exists():
                continue
            if is_admin:
                User.objects.create_superuser(name, password=name)
            else:
                User.objects.create_user(name, password=name)
            created.append(name)
        room, _ = Room.objects.get_or_create(name="lobby")
        room.members.add(*User.objects.filter(username__in=[n for n, _ in DEMO_USERS]))
        if created:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Created demo users {', '.join(created)} (password = user name)."
                )
            )
        self.stdout.write("Demo logins: admin/admin, alice/alice, bob/bob.")
