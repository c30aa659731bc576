"""The admin for clients (tabs): who, where, queue counters."""

from django.contrib import admin

from clients.models import Client


@admin.register(Client)
class ClientAdmin(admin.ModelAdmin):
    """
    Clients with their user, connection, head, acked seq and queue depth.
    """

    list_display = (
        "id",
        "user",
        "connected",
        "channel_name",
        "head",
        "acked_seq",
        "depth",
        "resync_required",
        "last_seen_at",
        "closing_at",
        "created_at",
    )
    list_select_related = ("user",)
    list_filter = ("resync_required",)
    search_fields = ("id", "user__username")
    readonly_fields = ("id", "created_at", "connected_at", "head", "acked_seq")
    ordering = ("-last_seen_at",)

    @admin.display(boolean=True, description="connected")
    def connected(self, obj: Client) -> bool:
        return obj.is_connected

    @admin.display(description="queue depth")
    def depth(self, obj: Client) -> int:
        return obj.queue_depth
