"""Signals of the tab lifecycle."""

from django.dispatch import Signal

# Sent with user_id and online (bool) after the transaction that made a user's first socket
# attach (online) or its last socket go away (offline), on any process.
presence_changed = Signal()
