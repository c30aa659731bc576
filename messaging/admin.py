"""The admin for messages, deliveries and rooms."""

import json

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db.models import Count
from django.http import HttpRequest

from messaging import admin_publish
from messaging.models import Delivery, Message, Room

# The index links the operator's overview (messaging/overview.py) above the apps.
admin.site.index_template = "admin/tabrelay_index.html"


class DeliveryInline(admin.TabularInline):
    """
    The queue entries of one message, one per target client still holding it.
    """

    model = Delivery
    fields = ("client", "seq")
    readonly_fields = ("client", "seq")
    extra = 0
    can_delete = False
    show_change_link = True


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    """
    Messages as stored: sender, target, the client's message id, the body.
    """

    list_display = (
        "id",
        "sender",
        "sender_client",
        "client_msg_id",
        "to_user",
        "room",
        "created_at",
        "body_preview",
    )
    list_select_related = ("sender", "to_user", "room")
    search_fields = ("client_msg_id", "sender__username")
    list_filter = ("room",)
    readonly_fields = (
        "sender",
        "sender_client",
        "client_msg_id",
        "to_user",
        "room",
        "created_at",
        "body",
    )
    exclude = ("wire",)
    inlines = [DeliveryInline]

    @admin.display(description="body")
    def body(self, obj: Message) -> str:
        return json.dumps(json.loads("{" + obj.wire[1:])["body"], ensure_ascii=False)

    @admin.display(description="body")
    def body_preview(self, obj: Message) -> str:
        text = self.body(obj)
        return text if len(text) <= 80 else text[:79] + "…"


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    """
    Queue entries: which client holds which message at which seq.
    """

    list_display = ("id", "client", "seq", "message")
    list_select_related = ("client", "message")
    search_fields = ("client__id",)
    raw_id_fields = ("client", "message")


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    """
    Rooms and their members.
    """

    list_display = ("name", "created_by", "created_at", "member_count")
    list_select_related = ("created_by",)
    search_fields = ("name",)
    filter_horizontal = ("members",)
    actions = [admin_publish.send_message_action]

    def has_publish_permission(self, request: HttpRequest) -> bool:
        return admin_publish.has_publish_permission(request)

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(num_members=Count("members"))

    @admin.display(description="members", ordering="num_members")
    def member_count(self, obj: Room) -> int:
        return obj.num_members  # type: ignore[attr-defined]


def _user_admin_with_publish() -> None:
    # The user admin as registered (django.contrib.auth's, or the project's), plus the action.
    User = get_user_model()
    base = type(admin.site.get_model_admin(User))

    class PublishingUserAdmin(base):  # type: ignore[valid-type, misc]
        """
        The user admin, with "Send a message…" to the selected users' tabs.
        """

        actions = [*(base.actions or []), admin_publish.send_message_action]

        def has_publish_permission(self, request: HttpRequest) -> bool:
            return admin_publish.has_publish_permission(request)

    admin.site.unregister(User)
    admin.site.register(User, PublishingUserAdmin)


_user_admin_with_publish()
