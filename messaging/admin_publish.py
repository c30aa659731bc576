"""
The admin action "Send a message…" on users and rooms: a compose page, then a publish per target.

Behind the permission messaging.publish_message: staff without it are not offered the action,
and the admin refuses it if they post it anyway (it is not among their action choices).
"""

import logging
import uuid
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from clients.errors import ServiceError
from messaging import conf, validation
from messaging.publishing import MAX_SENDER, publish
from messaging.wire import parse_json

logger = logging.getLogger(__name__)

PERMISSION = "messaging.publish_message"


class ComposeForm(forms.Form):
    """
    A message from the server: text (or a JSON value), the sender label, and the page's own key.
    """

    text = forms.CharField(widget=forms.Textarea(attrs={"rows": 4, "cols": 60}), strip=False)
    as_json = forms.BooleanField(
        required=False,
        label="The text is JSON",
        help_text='Sent as the body itself; otherwise the body is {"text": …}.',
    )
    sender = forms.CharField(max_length=MAX_SENDER, help_text="Shown as the sender.")
    # One key per compose page: submitting the page twice publishes once.
    key = forms.CharField(widget=forms.HiddenInput, max_length=64)

    def clean(self) -> dict[str, Any]:
        super().clean()
        data = self.cleaned_data
        text = data.get("text")
        if text is None:
            return data
        try:
            body = parse_json(text) if data.get("as_json") else {"text": text}
            validation.body_json(body)
        except ServiceError as exc:
            raise forms.ValidationError(exc.detail) from None
        data["body"] = body
        return data


def has_publish_permission(request: HttpRequest) -> bool:
    """
    Whether the admin user may send messages as the server.
    """
    return request.user.has_perm(PERMISSION)


def send_message(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet
) -> HttpResponse | None:
    """
    Compose a message to the selected users or rooms, then publish it to each of them.
    """
    if not has_publish_permission(request):
        raise PermissionDenied
    targets = list(queryset)
    if "post" in request.POST:
        form = ComposeForm(request.POST)
        if form.is_valid():
            return _publish_all(modeladmin, request, targets, form.cleaned_data)
    else:
        form = ComposeForm(
            initial={"sender": conf.get("MESSAGING_SERVER_SENDER"), "key": uuid.uuid4().hex}
        )
    opts = modeladmin.model._meta
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": "Send a message",
        "opts": opts,
        "targets": targets,
        "form": form,
        "action": request.POST.get("action", "send_message"),
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "media": modeladmin.media,
    }
    return TemplateResponse(request, "admin/messaging/send_message.html", context)


def _publish_all(
    modeladmin: admin.ModelAdmin, request: HttpRequest, targets: list, data: dict
) -> HttpResponse | None:
    # One publish (one short transaction) per target: a single transaction over all of them would
    # lock their clients' rows in selection order, which can deadlock with a tab's send (that
    # locks in id order). Each target's key derives from the page's, so submitting the page
    # again, after a failure half-way too, sends only what is missing.
    sent = duplicates = 0
    try:
        for target in targets:
            key = f"admin:{data['key']}"
            result = publish(target, data["body"], key=key, sender=data["sender"])
            duplicates += result.duplicate
            sent += not result.duplicate
    except ServiceError as exc:
        modeladmin.message_user(
            request, f"Sent to {sent} target(s), then stopped: {exc.detail}", messages.ERROR
        )
        return None
    logger.info("user %s published to %d target(s) from the admin", request.user.pk, sent)
    text = f"Sent the message to {sent} {'target' if sent == 1 else 'targets'}."
    if duplicates:
        text += f" {duplicates} had it already (the page was submitted twice)."
    modeladmin.message_user(request, text, messages.SUCCESS)
    return None


send_message_action = admin.action(description="Send a message…", permissions=["publish"])(
    send_message
)
