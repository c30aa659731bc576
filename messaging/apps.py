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
        from clients.scheduler import register_job
        from clients.signals import presence_changed
        from messaging import checks  # noqa: F401  (registers the system checks)
        from messaging.presence import announce_presence
        from messaging.retention import prune_history

        register_job("history retention", prune_history)
        presence_changed.connect(announce_presence, dispatch_uid="messaging.presence")
