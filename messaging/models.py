"""Messages (the history), deliveries (per-client queue entries) and rooms."""

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

from clients.models import Client


class Room(models.Model):
    """
    A named conversation; only members receive or post its messages.
    """

    name = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL, related_name="chat_rooms", blank=True
    )

    def __str__(self) -> str:
        return self.name


# The `sender_client` of every message published by the server (messaging.publishing): no tab
# has it (client ids are UUID4s), and with the publish key in `client_msg_id` the dedup constraint
# makes a retried publish store nothing new, as a tab's retried send does.
SERVER_CLIENT = uuid.UUID(int=0)


class Message(models.Model):
    """
    One message as sent, stored once.

    `wire` holds the message object as the protocol sends it, less its leading id (ASCII JSON
    text, so any JSON body survives every database); frames and HTTP answers embed it without
    decoding the body again (see `messaging.wire`).
    """

    # None for a message published by the server.
    sender = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="sent_chat_messages",
    )
    # Not a foreign key: history and dedup outlive the tab that sent the message.
    sender_client = models.UUIDField()
    client_msg_id = models.CharField(max_length=100)
    to_user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="received_chat_messages",
    )
    # Indexed together with id below (room history pages).
    room = models.ForeignKey(
        Room,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="messages",
        db_index=False,
    )
    created_at = models.DateTimeField(default=timezone.now)
    wire = models.TextField()

    class Meta:
        permissions = [("publish_message", "Can send messages as the server")]
        constraints = [
            models.UniqueConstraint(
                fields=["sender_client", "client_msg_id"], name="message_dedup_uniq"
            ),
            models.CheckConstraint(
                condition=(
                    models.Q(to_user__isnull=False, room__isnull=True)
                    | models.Q(to_user__isnull=True, room__isnull=False)
                ),
                name="message_one_target",
            ),
        ]
        indexes = [
            models.Index(fields=["room", "id"], name="message_room_id_idx"),
            # Direct-message history: one direction of a conversation, newest first. Partial:
            # room messages (most of them) cost a send nothing here.
            models.Index(
                fields=["to_user", "sender", "id"],
                name="message_direct_idx",
                condition=models.Q(to_user__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.client_msg_id}"


class Delivery(models.Model):
    """
    One message in one client's queue, at that client's `seq`; deleted by the client's ack.
    """

    # No index of its own: the (client, seq) unique constraint below serves client look-ups.
    client = models.ForeignKey(
        Client, on_delete=models.CASCADE, related_name="deliveries", db_index=False
    )
    seq = models.PositiveBigIntegerField()
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="deliveries")

    class Meta:
        constraints = [
            # Also the index of the hot query: a client's deliveries above a seq, in order.
            models.UniqueConstraint(fields=["client", "seq"], name="delivery_client_seq_uniq"),
        ]
        verbose_name_plural = "deliveries"

    def __str__(self) -> str:
        return f"{self.client_id}#{self.seq}"
