"""
Login throttling with django-axes (settings: AXES_*): the client address, what a successful login
clears, and the answer to a locked-out login (the login page with a message, or JSON, both 429).
"""

import math
from typing import Any

from axes.handlers.database import AxesDatabaseHandler
from axes.helpers import get_client_username
from axes.models import AccessAttempt
from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.forms.utils import ErrorDict
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render


def client_ip(request: HttpRequest) -> str | None:
    """
    The client's address: the peer's, or behind AXES_IPWARE_PROXY_COUNT proxies the entry of
    X-Forwarded-For that the outermost of them appended.
    """
    proxies = settings.AXES_IPWARE_PROXY_COUNT or 0
    if proxies > 0:
        hops = [h.strip() for h in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        hops = [h for h in hops if h]
        if len(hops) >= proxies:
            return hops[-proxies]
    return request.META.get("REMOTE_ADDR")


class LoginAttempts(AxesDatabaseHandler):
    """
    axes' database handler, except that a successful login clears only the failures of that
    username from that address. axes' own reset clears every failure of the username and every
    failure from the address: one's own account would then reset the count of the accounts one
    guesses from the same address.
    """

    def reset_user_attempts(self, request: HttpRequest, credentials: dict | None = None) -> int:
        username = get_client_username(request, credentials)
        ip_address = getattr(request, "axes_ip_address", None)
        attempts = AccessAttempt.objects.filter(username=username, ip_address=ip_address)
        count, _ = attempts.delete()
        return count


class _LockedOutForm(AuthenticationForm):
    # The login form, unbound, carrying the lockout message as its one error.
    def __init__(self, request: HttpRequest, message: str, **kwargs: Any) -> None:
        super().__init__(request, **kwargs)
        self.message = message

    def full_clean(self) -> None:
        self._errors = ErrorDict()
        self.cleaned_data = {}
        self.add_error(None, self.message)


def locked_out(
    request: HttpRequest, original_response: Any = None, credentials: dict | None = None
) -> HttpResponse:
    """
    The answer to a login while its username or address is locked out: 429 with Retry-After,
    as JSON `{"error": {"code": "login_throttled", ...}}` to a client that asks for JSON, else
    the login page with the message.
    """
    seconds = int(settings.AXES_COOLOFF_TIME.total_seconds())
    minutes = max(1, math.ceil(seconds / 60))
    detail = (
        "Too many failed logins for this account or from this address. "
        f"Try again in {minutes} minute{'s' if minutes != 1 else ''}."
    )
    response: HttpResponse
    accept = request.headers.get("Accept", "")
    if "json" in request.content_type or (
        "application/json" in accept and "text/html" not in accept
    ):
        response = JsonResponse(
            {"error": {"code": "login_throttled", "detail": detail}}, status=429
        )
    else:
        username = get_client_username(request, credentials) or ""
        form = _LockedOutForm(request, detail, initial={"username": username})
        context = {
            "form": form,
            "site_header": "Tab relay",
            "title": "Log in",
            "app_path": request.get_full_path(),
            "next": request.POST.get("next", request.GET.get("next", "")),
        }
        response = render(request, "admin/login.html", context, status=429)
    response["Retry-After"] = str(seconds)
    return response
