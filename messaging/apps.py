"""App config for messages, deliveries, rooms and their transports."""

from django.apps import AppConfig


class MessagingConfig(AppConfig):
    """
    Messages, per-client deliveries, rooms, the WebSocket consumer and the HTTP API.
    """

    name = "messaging"
    verbose_name = "Messaging"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from messaging import checks  # noqa: F401  (registers the system checks)
