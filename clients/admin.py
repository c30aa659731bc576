"""The admin as an operator's tool: tabs, their sockets and queues, and the server processes."""

from datetime import timedelta
from typing import Any, cast

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from clients import conf, services
from clients.models import Client, ClientQuerySet, ServerProcess


class ConnectedFilter(admin.SimpleListFilter):
    """
    Clients with or without an open socket.
    """

    title = "connected"
    parameter_name = "connected"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Connected"), ("no", "Not connected")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet | None:
        if self.value() == "yes":
            return cast(ClientQuerySet, queryset).connected()
        if self.value() == "no":
            return cast(ClientQuerySet, queryset).disconnected()
        return None


class StaleFilter(admin.SimpleListFilter):
    """
    Clients the next cleanup would remove as stale (no socket, silent past the timeout).
    """

    title = "stale"
    parameter_name = "stale"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Stale"), ("no", "Not stale")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet | None:
        cutoff = timezone.now() - timedelta(seconds=conf.get("CLIENTS_STALE_AFTER"))
        stale = {"channel_name": "", "last_seen_at__lt": cutoff}
        if self.value() == "yes":
            return queryset.filter(**stale)
        if self.value() == "no":
            return queryset.exclude(**stale)
        return None


class ClosingFilter(admin.SimpleListFilter):
    """
    Clients marked closing by the pagehide beacon, within or past their grace period.
    """

    title = "closing"
    parameter_name = "closing"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("grace", "Closing, in grace period"),
            ("expired", "Closing, grace expired"),
            ("no", "Not closing"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet | None:
        cutoff = timezone.now() - timedelta(seconds=conf.get("CLIENTS_CLOSE_GRACE"))
        if self.value() == "grace":
            return queryset.filter(closing_at__gte=cutoff)
        if self.value() == "expired":
            return queryset.filter(closing_at__lt=cutoff)
        if self.value() == "no":
            return queryset.filter(closing_at__isnull=True)
        return None


@admin.register(Client)
class ClientAdmin(admin.ModelAdmin):
    """
    Clients with user, connection (and which process), last seen, head, acked seq and depth.
    """

    list_display = (
        "id",
        "user",
        "connected",
        "server",
        "last_seen_at",
        "head",
        "acked_seq",
        "depth",
        "resync_required",
        "closing_at",
        "created_at",
    )
    list_select_related = ("user",)
    list_filter = (ConnectedFilter, StaleFilter, ClosingFilter, "resync_required")
    search_fields = ("id", "user__username", "server")
    readonly_fields = (
        "id",
        "user",
        "created_at",
        "connected_at",
        "channel_name",
        "server",
        "head",
        "acked_seq",
        "last_seen_at",
        "closing_at",
        "resync_required",
    )
    ordering = ("-last_seen_at",)
    actions = ["disconnect", "delete_with_queues"]

    def get_actions(self, request: HttpRequest) -> dict:
        actions = super().get_actions(request)
        # Django's bulk delete would skip the socket close and presence: use ours instead.
        actions.pop("delete_selected", None)
        return actions

    @admin.display(boolean=True, description="connected")
    def connected(self, obj: Client) -> bool:
        return obj.is_connected

    @admin.display(description="queue depth")
    def depth(self, obj: Client) -> int:
        return obj.queue_depth

    # Both change data: an operator with only "Can view client" is neither offered them nor
    # allowed to post them (Django checks has_<permission>_permission before running one).
    @admin.action(
        description="Disconnect the selected clients (their tabs reconnect)",
        permissions=["change"],
    )
    def disconnect(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = services.kick_clients(list(queryset.values_list("id", flat=True)))
        self.message_user(request, f"Disconnected {count} client(s).", messages.SUCCESS)

    @admin.action(
        description="Delete the selected clients and their queues", permissions=["delete"]
    )
    def delete_with_queues(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = services.delete_clients(list(queryset.values_list("id", flat=True)))
        self.message_user(request, f"Deleted {count} client(s).", messages.SUCCESS)

    def delete_model(self, request: HttpRequest, obj: Client) -> None:
        services.delete_clients([obj.pk])


@admin.register(ServerProcess)
class ServerProcessAdmin(admin.ModelAdmin):
    """
    The server processes heart-beating into this database, and whether they look alive.
    """

    list_display = ("id", "hostname", "pid", "started_at", "heartbeat_at", "alive")
    readonly_fields = ("id", "hostname", "pid", "started_at", "heartbeat_at")

    @admin.display(boolean=True, description="alive")
    def alive(self, obj: ServerProcess) -> bool:
        timeout = timedelta(seconds=conf.get("CLIENTS_PROCESS_TIMEOUT"))
        return timezone.now() - obj.heartbeat_at < timeout

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
