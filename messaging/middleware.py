"""
The first HTTP middleware: request data that Django itself refuses is answered before anything
else reads it.
"""

import logging
from collections.abc import Callable

from django.core.exceptions import BadRequest, SuspiciousOperation
from django.http import HttpRequest, HttpResponse
from django.http.multipartparser import MultiPartParserError

from messaging.views import bad_request

logger = logging.getLogger(__name__)

FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")


class RefuseUnreadableRequests:
    """
    A foreign Host, too many query or form fields, an oversized or broken form: handler400's
    answer in both DEBUG modes. With DEBUG on Django would show its technical page (settings and
    paths), and that page itself fails with a 500 on too many fields.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            request.get_host()
            request.GET  # noqa: B018 - parsing it is the check (DATA_UPLOAD_MAX_NUMBER_FIELDS)
            request.COOKIES  # noqa: B018
            # The JSON API refuses form bodies itself, after its login check (401 first); the
            # login and admin forms would parse them in the CSRF check.
            if (
                request.method == "POST"
                and request.content_type in FORMS
                and not request.path.startswith("/api/")
            ):
                request.POST  # noqa: B018
        except (SuspiciousOperation, BadRequest, MultiPartParserError) as exc:
            logger.warning("bad request %s: %s: %s", request.path, type(exc).__name__, exc)
            return bad_request(request, exc)
        return self.get_response(request)
