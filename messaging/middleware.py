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
UNREADABLE = (SuspiciousOperation, BadRequest, MultiPartParserError)


class RefuseUnreadableRequests:
    """
    A foreign Host, too many query or form fields, an oversized or broken form: handler400's
    answer in both DEBUG modes. With DEBUG on Django would show its technical page (settings and
    paths), and that page itself fails with a 500 on too many fields.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        # Checked here, as the middleware after this one reads them outside any view: the Host
        # (SecurityMiddleware, CommonMiddleware) and a form body (the CSRF check). The JSON API
        # refuses form bodies itself, after its login check (401 first).
        try:
            request.get_host()
            if (
                request.method == "POST"
                and request.content_type in FORMS
                and not request.path.startswith("/api/")
            ):
                request.POST  # noqa: B018 - parsing it is the check
        except UNREADABLE as exc:
            return self._refuse(request, exc)
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """
        The same answer when a view is the first to read the data (e.g. its query string).
        """
        if not isinstance(exception, UNREADABLE):
            return None
        return self._refuse(request, exception)

    def _refuse(self, request: HttpRequest, exception: Exception) -> HttpResponse:
        logger.warning("bad request %s: %s: %s", request.path, type(exception).__name__, exception)
        return bad_request(request, exception)
