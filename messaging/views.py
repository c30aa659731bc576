"""
The HTTP transport: the protocol's JSON API over Django session auth, plus the chat page.

Views parse and call the service layer; errors from it become `{"error": {"code", "detail"}}`.
"""

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.request import RawPostDataException
from django.middleware.csrf import CsrfViewMiddleware
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt, ensure_csrf_cookie

from clients import services as client_services
from clients.errors import Malformed, ServiceError, TooLarge
from messaging import conf, direct, services, validation
from messaging.wire import deliveries_json, messages_json, parse_json

logger = logging.getLogger(__name__)

JSON = "application/json"


def error_response(status: int, code: str, detail: str) -> JsonResponse:
    """
    The protocol's error body with an HTTP status.
    """
    return JsonResponse({"error": {"code": code, "detail": detail}}, status=status)


def failure_response(request: HttpRequest, exc: Exception) -> HttpResponse:
    """
    The answer to a failure an API call can meet: a service error's status and code, or 503 when
    the database went away (restart, failover, killed connection): nothing was committed, and
    every call of the API is safe to retry.
    """
    if isinstance(exc, ServiceError):
        return error_response(exc.status, exc.code, exc.detail)
    logger.warning("database unavailable for %s: %s", request.path, exc)
    response = error_response(503, "unavailable", "the database is unavailable; retry")
    response["Retry-After"] = "1"
    return response


def _csrf_reject(request: HttpRequest) -> HttpResponse | None:
    # Run Django's own CSRF check, but after the login check: an anonymous caller gets 401.
    middleware = CsrfViewMiddleware(lambda req: HttpResponse())
    try:
        return middleware.process_view(request, lambda req: HttpResponse(), (), {})
    except RequestDataTooBig:
        # The check reads form bodies (a sendBeacon close) for csrfmiddlewaretoken.
        raise TooLarge("request body too large", code="body_too_large") from None
    except SuspiciousOperation:
        # E.g. more form fields than DATA_UPLOAD_MAX_NUMBER_FIELDS.
        raise Malformed("the request body could not be parsed", code="malformed") from None


def api(*methods: str) -> Callable:
    """
    Make a view a JSON API endpoint: allowed methods, login (401), CSRF on unsafe methods (403),
    a size-limited JSON body (400/413) as `request.json`, and ServiceError turned into its status.
    """

    def decorate(view: Callable) -> Callable:
        @csrf_exempt
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                response = error_response(405, "method_not_allowed", f"use {' or '.join(methods)}")
                response["Allow"] = ", ".join(methods)
                return response
            try:
                client_services.require_user(request.user)
                if request.method not in ("GET", "HEAD", "OPTIONS", "TRACE"):
                    rejected = _csrf_reject(request)
                    if rejected is not None:
                        return rejected
                _check_size(request)
                return view(request, *args, **kwargs)
            except (ServiceError, OperationalError, InterfaceError) as exc:
                return failure_response(request, exc)

        return wrapper

    return decorate


def _check_size(request: HttpRequest) -> None:
    # Django itself would answer 400, and only past 2.5 MiB: the 413 must come from here.
    limit = conf.max_request_bytes()
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise Malformed("invalid Content-Length", code="malformed") from None
    if declared > limit:
        raise TooLarge(f"request body over {limit} bytes", code="body_too_large")


def _object(request: HttpRequest) -> dict:
    """
    The request body parsed as a JSON object.
    """
    try:
        raw = request.body
    except RequestDataTooBig:
        raise TooLarge("request body too large", code="body_too_large") from None
    except RawPostDataException:
        # The CSRF check has already streamed a multipart form body: it is no JSON object.
        raise Malformed("the request body must be a JSON object", code="malformed") from None
    if len(raw) > conf.max_request_bytes():
        raise TooLarge("request body too large", code="body_too_large")
    body = parse_json(raw) if raw.strip() else None
    if not isinstance(body, dict):
        raise Malformed("the request body must be a JSON object", code="malformed")
    return body


def _json_text(text: str, status: int = 200) -> HttpResponse:
    return HttpResponse(text, status=status, content_type=JSON)


# -- clients -----------------------------------------------------------------------------------


@api("POST")
def clients_collection(request: HttpRequest) -> HttpResponse:
    """
    POST /api/clients/: register a new tab of the logged-in user.
    """
    client = client_services.register_client(request.user)
    return JsonResponse({"client_id": str(client.id), "head": client.head}, status=201)


@api("DELETE")
def client_detail(request: HttpRequest, client_id: str) -> HttpResponse:
    """
    DELETE /api/clients/{id}/: delete the client and its queue now.
    """
    client_services.delete_client(request.user, client_id)
    return HttpResponse(status=204)


@api("POST")
def client_close(request: HttpRequest, client_id: str) -> HttpResponse:
    """
    POST /api/clients/{id}/close?conn=N: the tab is probably closing (sendBeacon on pagehide);
    `conn` is the page's last connection attempt, so a late beacon cannot close a newer socket.
    """
    # Without `conn`, the page counts as the oldest (0): it cannot close a client that a
    # numbered socket attached since.
    attempt = validation.int_param(request.GET.get("conn"), "conn", default=0)
    client_services.mark_closing(request.user, client_id, attempt)
    return HttpResponse(status=204)


@api("GET")
def client_messages(request: HttpRequest, client_id: str) -> HttpResponse:
    """
    GET /api/clients/{id}/messages?after=N&limit=L: unacked deliveries with seq > N.
    """
    after = validation.int_param(request.GET.get("after"), "after", default=0)
    limit = validation.limit_param(request.GET.get("limit"))
    page = services.pending(request.user, client_id, after, limit)
    extra = {"resync_required": True} if page.resync_required else {}
    return _json_text(deliveries_json(page.rows, page.head, **extra))


@api("POST")
def client_ack(request: HttpRequest, client_id: str) -> HttpResponse:
    """
    POST /api/clients/{id}/ack {"seq": N}: delete deliveries with seq <= N.
    """
    body = _object(request)
    if "seq" not in body:
        raise Malformed("seq is required", code="invalid_seq")
    acked = services.ack(request.user, client_id, body["seq"])
    return JsonResponse({"acked": acked})


# -- messages and rooms ------------------------------------------------------------------------


@api("POST")
def messages_collection(request: HttpRequest) -> HttpResponse:
    """
    POST /api/messages/: send (201), or answer a retry of a stored message (200, duplicate).
    """
    body = _object(request)
    if "body" not in body:
        raise Malformed("body is required", code="invalid_body")
    if not isinstance(body.get("client_id"), str):
        # A string that names no client is 404 below; anything else is not a client id at all.
        raise Malformed("client_id must be a client UUID string", code="invalid_client_id")
    result = services.send_message(
        request.user, body["client_id"], body.get("client_msg_id"), body.get("to"), body["body"]
    )
    return JsonResponse(
        {"id": result.id, "duplicate": result.duplicate}, status=200 if result.duplicate else 201
    )


@api("GET", "POST")
def rooms_collection(request: HttpRequest) -> HttpResponse:
    """
    GET /api/rooms/: the user's rooms. POST /api/rooms/ {"name"}: create one.
    """
    if request.method == "GET":
        return JsonResponse({"rooms": services.list_rooms(request.user)})
    return JsonResponse(
        services.create_room(request.user, _object(request).get("name")), status=201
    )


@api("POST")
def room_join(request: HttpRequest, name: str) -> HttpResponse:
    """
    POST /api/rooms/{name}/join.
    """
    return JsonResponse(services.join_room(request.user, name))


@api("POST")
def room_leave(request: HttpRequest, name: str) -> HttpResponse:
    """
    POST /api/rooms/{name}/leave.
    """
    return JsonResponse(services.leave_room(request.user, name))


@api("GET")
def room_messages(request: HttpRequest, name: str) -> HttpResponse:
    """
    GET /api/rooms/{name}/messages?before=ID&limit=L: history, newest last.
    """
    raw_before = request.GET.get("before")
    before = None if raw_before is None else validation.int_param(raw_before, "before", default=0)
    limit = validation.limit_param(request.GET.get("limit"))
    return _json_text(messages_json(services.room_history(request.user, name, before, limit)))


def _before_param(request: HttpRequest) -> int | None:
    raw = request.GET.get("before")
    return None if raw is None else validation.int_param(raw, "before", default=0)


@api("GET")
def direct_collection(request: HttpRequest) -> HttpResponse:
    """
    GET /api/direct/?limit=L: the users the caller has direct messages with, newest first.
    """
    limit = validation.limit_param(request.GET.get("limit"))
    return JsonResponse({"conversations": direct.conversations(request.user, limit)})


@api("GET")
def direct_messages(request: HttpRequest, name: str) -> HttpResponse:
    """
    GET /api/direct/{name}/messages?before=ID&limit=L: the caller's direct messages with
    {name}, both ways, newest last.
    """
    limit = validation.limit_param(request.GET.get("limit"))
    rows = direct.direct_history(request.user, name, _before_param(request), limit)
    return _json_text(messages_json(rows))


@api("GET")
def notices(request: HttpRequest) -> HttpResponse:
    """
    GET /api/notices/?before=ID&limit=L: the messages the server published to the caller (not
    to a room), newest last.
    """
    limit = validation.limit_param(request.GET.get("limit"))
    return _json_text(messages_json(direct.notices(request.user, _before_param(request), limit)))


# -- edges -------------------------------------------------------------------------------------


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """
    CSRF_FAILURE_VIEW: a JSON 403 instead of Django's HTML page.
    """
    return error_response(403, "csrf_failed", f"CSRF verification failed: {reason}")


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """
    handler400: JSON under /api/ for request data Django itself refuses (a Host header not in
    ALLOWED_HOSTS, too many query fields, a form body the CSRF check cannot parse).
    """
    if request.path.startswith("/api/"):
        return error_response(400, "malformed", "the request could not be parsed")
    return HttpResponse("Bad request", status=400, content_type="text/plain")


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """
    handler404: JSON under /api/, Django's plain page elsewhere.
    """
    if request.path.startswith("/api/"):
        return error_response(404, "not_found", "no such API endpoint")
    return HttpResponse("Not found", status=404, content_type="text/plain")


def server_error(request: HttpRequest) -> HttpResponse:
    """
    handler500: JSON under /api/ so programs can still read the answer.
    """
    if request.path.startswith("/api/"):
        return error_response(500, "internal_error", "the server failed; retry later")
    return HttpResponse("Server error", status=500, content_type="text/plain")


@login_required
@ensure_csrf_cookie
def home(request: HttpRequest) -> HttpResponse:
    """
    The chat page (messaging/static/messaging/chat.js over relay.js); the CSRF cookie is set
    for the page's fetch calls and its close beacon.
    """
    return render(request, "messaging/home.html")
