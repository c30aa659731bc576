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
        from clients import checks  # noqa: F401  (registers the system checks)
