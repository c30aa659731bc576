"""
The HTTP server API: `POST /api/server/publish` for services that are not Django code.

A bearer token from settings (MESSAGING_SERVER_API_TOKEN) instead of a session, so no CSRF; off
(404) while the token is unset. The body and key are the Python publish's (messaging.publishing).
"""

import hmac
import logging

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from clients.errors import Malformed, ServiceError
from messaging import conf, publishing
from messaging.views import _check_size, _object, error_response, failure_response, not_found

logger = logging.getLogger(__name__)


def _authorized(request: HttpRequest, token: str) -> bool:
    scheme, _, given = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    # Compared in constant time, as bytes (compare_digest takes only ASCII str).
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")
    )


@csrf_exempt
def publish(request: HttpRequest) -> HttpResponse:
    """
    POST /api/server/publish {"to", "body", "key"?, "sender"?}: 201 {"id", "duplicate": false},
    or 200 {"id", "duplicate": true} for a retry of a stored key; 401 without the token.
    """
    token = conf.get("MESSAGING_SERVER_API_TOKEN")
    if not token:
        return not_found(request)
    if not _authorized(request, token):
        response = error_response(401, "not_authenticated", "a valid bearer token is required")
        response["WWW-Authenticate"] = 'Bearer realm="tabrelay"'
        return response
    if request.method != "POST":
        response = error_response(405, "method_not_allowed", "use POST")
        response["Allow"] = "POST"
        return response
    try:
        _check_size(request)
        body = _object(request)
        if "body" not in body:
            raise Malformed("body is required", code="invalid_body")
        for name in ("key", "sender"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise Malformed(f"{name} must be a string", code=f"invalid_{name}")
        if isinstance(body.get("to"), str):
            # Only the protocol's object here; "user:NAME" is the command line's spelling.
            raise Malformed('to must be {"user": name} or {"room": name}', code="invalid_to")
        result = publishing.publish(
            body.get("to"), body["body"], key=body.get("key"), sender=body.get("sender")
        )
    except (ServiceError, OperationalError, InterfaceError) as exc:
        # A 503 committed nothing: the caller retries with the same key.
        return failure_response(request, exc)
    return JsonResponse(
        {"id": result.id, "duplicate": result.duplicate}, status=200 if result.duplicate else 201
    )
