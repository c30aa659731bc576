"""App config for the tab lifecycle."""

from django.apps import AppConfig


class ClientsConfig(AppConfig):
    """
    Browser tabs (clients): registration, attachment to sockets, close and stale cleanup.
    """

    name = "clients"
    verbose_name = "Clients (tabs)"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.conf import settings
        from django.contrib.auth.signals import user_logged_out
        from django.db.models.signals import post_delete, post_save

        from clients import (
            checks,  # noqa: F401  (registers the system checks)
            sessions,
        )

        user_logged_out.connect(sessions.user_logged_out_receiver, dispatch_uid="clients.logout")
        user = settings.AUTH_USER_MODEL
        post_save.connect(sessions.user_saved_receiver, sender=user, dispatch_uid="clients.reauth")
        post_delete.connect(
            sessions.user_deleted_receiver, sender=user, dispatch_uid="clients.reauth-delete"
        )
