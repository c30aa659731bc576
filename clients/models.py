"""The client model: one browser tab (or program instance) of a user."""

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


class ClientQuerySet(models.QuerySet):
    """
    Queries over clients.
    """

    def connected(self) -> "ClientQuerySet":
        """
        Clients with an open WebSocket somewhere.
        """
        return self.exclude(channel_name="")

    def disconnected(self) -> "ClientQuerySet":
        """
        Clients without an open WebSocket.
        """
        return self.filter(channel_name="")


class Client(models.Model):
    """
    One tab of a user, with a persistent id that outlives its sockets, and its queue's counters.

    `head` is the last seq assigned to this client and `acked_seq` the last one it acked; since an
    ack deletes every delivery up to it and seqs are gapless, the queue depth is their difference.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_clients"
    )
    created_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)
    # The channel name of the consumer holding this client's socket; empty when not connected.
    channel_name = models.CharField(max_length=200, blank=True, default="")
    # The server process holding that socket (ServerProcess.id), so a dead process's sockets can
    # be told from live ones.
    server = models.CharField(max_length=64, blank=True, default="")
    connected_at = models.DateTimeField(null=True, blank=True)
    # The highest connection attempt number (`conn`) the tab has attached with: an older
    # attempt that reaches the server late is refused instead of superseding the newer socket.
    last_attempt = models.PositiveBigIntegerField(default=0)
    # Set by the pagehide beacon; cleared when the tab connects again.
    closing_at = models.DateTimeField(null=True, blank=True)
    head = models.PositiveBigIntegerField(default=0)
    acked_seq = models.PositiveBigIntegerField(default=0)
    # The queue hit MESSAGING_QUEUE_LIMIT and deliveries were skipped: the tab must reload history.
    resync_required = models.BooleanField(default=False)

    objects = ClientQuerySet.as_manager()

    class Meta:
        indexes = [
            models.Index(fields=["last_seen_at"], name="client_last_seen_idx"),
            models.Index(fields=["closing_at"], name="client_closing_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.user_id})"

    @property
    def queue_depth(self) -> int:
        """
        Unacked deliveries in this client's queue.
        """
        return self.head - self.acked_seq

    @property
    def is_connected(self) -> bool:
        """
        Whether a socket is attached to this client right now.
        """
        return bool(self.channel_name)


def client_group(client_id: object) -> str:
    """
    The channel-layer group of one client's sockets (at most one at a time, but groups survive
    process boundaries).
    """
    return f"client.{client_id}"


def user_group(user_id: object) -> str:
    """
    The channel-layer group of all sockets of one user, for ephemeral events (typing, presence).
    """
    return f"user.{user_id}"


class ServerProcess(models.Model):
    """
    A running server process, alive while its heartbeat is recent.
    """

    id = models.CharField(max_length=64, primary_key=True)
    hostname = models.CharField(max_length=255, blank=True)
    pid = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField(default=timezone.now)
    heartbeat_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.hostname}:{self.pid} ({self.id})"


class Lease(models.Model):
    """
    A named lease: the process holding it, until it expires, is the one doing that job.
    """

    name = models.CharField(max_length=64, primary_key=True)
    holder = models.CharField(max_length=64, blank=True)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} held by {self.holder or 'nobody'}"
