"""
The WebSocket side's middleware: the Origin check (as Django's CSRF check does it) and session
and auth (channels' AuthMiddlewareStack, less a wrapper around every frame sent).
"""

from collections import defaultdict
from typing import Any
from urllib.parse import urlsplit

from channels.auth import AuthMiddleware
from channels.security.websocket import WebsocketDenier
from channels.sessions import CookieMiddleware, InstanceSessionWrapper
from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.utils.http import is_same_domain


class CsrfOriginValidator:
    """
    Lets a WebSocket handshake through only when its Origin is one that Django's CSRF check
    accepts for an unsafe HTTP request to the same host: exactly scheme://host[:port] of the
    request, or an entry of CSRF_TRUSTED_ORIGINS (with their `*.` subdomain wildcards); the host
    must also be in ALLOWED_HOSTS. Others are refused before accept (daphne answers HTTP 403).

    channels' AllowedHostsOriginValidator compared host names only: another scheme or port of
    the same host (http://localhost:9 for a site on :8000) got a socket with the user's cookie.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict, receive: Any, send: Any) -> Any:
        if scope.get("type") == "websocket" and not origin_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.inner(scope, receive, send)


def _headers(scope: dict) -> dict[str, str]:
    # The last value of each header, as Django's request.META keeps it.
    return {
        name.decode("latin-1").lower(): value.decode("latin-1")
        for name, value in scope.get("headers", [])
    }


def _is_secure(scope: dict, headers: dict[str, str]) -> bool:
    # request.is_secure(), SECURE_PROXY_SSL_HEADER included.
    if settings.SECURE_PROXY_SSL_HEADER:
        meta_name, secure_value = settings.SECURE_PROXY_SSL_HEADER
        name = meta_name.removeprefix("HTTP_").replace("_", "-").lower()
        value = headers.get(name)
        if value is not None:
            return value.split(",", 1)[0].strip() == secure_value
    return scope.get("scheme") in ("wss", "https")


def _host(scope: dict, headers: dict[str, str], secure: bool) -> str | None:
    # request.get_host(), before its ALLOWED_HOSTS check.
    if settings.USE_X_FORWARDED_HOST and "x-forwarded-host" in headers:
        return headers["x-forwarded-host"]
    if "host" in headers:
        return headers["host"]
    server = scope.get("server")
    if not server or server[0] is None:
        return None
    name, port = server[0], str(server[1])
    return name if port == ("443" if secure else "80") else f"{name}:{port}"


def origin_allowed(scope: dict) -> bool:
    """
    Whether the handshake in `scope` comes from an Origin that Django's CSRF check would accept
    for this host, and the host is an allowed one.
    """
    headers = _headers(scope)
    origin = headers.get("origin")
    if not origin:
        return False
    secure = _is_secure(scope, headers)
    host = _host(scope, headers, secure)
    if host is None:
        return False
    domain, _port = split_domain_port(host)
    allowed_hosts = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed_hosts:
        allowed_hosts = [".localhost", "127.0.0.1", "[::1]"]  # as Django's get_host
    if not domain or not validate_host(domain, allowed_hosts):
        return False
    if origin == f"{'https' if secure else 'http'}://{host}":
        return True
    trusted = settings.CSRF_TRUSTED_ORIGINS
    if origin in {o for o in trusted if "*" not in o}:
        return True
    try:
        parsed = urlsplit(origin)
    except ValueError:
        return False
    wildcards: defaultdict[str, list[str]] = defaultdict(list)
    for entry in trusted:
        if "*" in entry:
            entry_parts = urlsplit(entry)
            wildcards[entry_parts.scheme].append(entry_parts.netloc.lstrip("*"))
    return any(is_same_domain(parsed.netloc, pattern) for pattern in wildcards[parsed.scheme])


class SocketSessionMiddleware:
    """
    Puts the Django session (from the cookie) in the scope, as channels' SessionMiddleware does,
    but hands the inner application the server's own `send`.

    Channels' version wraps `send` to save a modified session on HTTP responses: on a socket it
    only looked at the session for every frame (a seventh of the event loop's time in fan-out to
    1,000 tabs). The consumers here never write the session.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict, receive: Any, send: Any) -> Any:
        wrapper = InstanceSessionWrapper(scope, send)
        await wrapper.resolve_session()
        return await self.inner(wrapper.scope, receive, send)


def SocketAuthMiddlewareStack(inner: Any) -> Any:
    """
    Cookie, session and user in the scope, for WebSocket consumers that never save the session.
    """
    return CookieMiddleware(SocketSessionMiddleware(AuthMiddleware(inner)))
