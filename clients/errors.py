"""
The one exception family for errors a client can cause.

Service functions raise these; the HTTP API turns them into `{"error": {...}}` responses with
`status`, the consumer into `error` frames (or, while connecting, a close with `4000 + status`).
"""


class ServiceError(Exception):
    """
    An error caused by what a client sent, with a stable `code` and an HTTP status.
    """

    status = 400
    code = "bad_request"

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code

    @property
    def close_code(self) -> int:
        """
        The WebSocket close code used when this error refuses a connection.
        """
        return 4000 + self.status


class Malformed(ServiceError):
    """
    The request or frame does not have the shape the protocol asks for.
    """

    status = 400
    code = "malformed"


class NotAuthenticated(ServiceError):
    """
    Nobody is logged in.
    """

    status = 401
    code = "not_authenticated"


class Forbidden(ServiceError):
    """
    The thing exists but belongs to someone else (another user's client, a room one is not in).
    """

    status = 403
    code = "forbidden"


class NotFound(ServiceError):
    """
    No such client, room or user.
    """

    status = 404
    code = "not_found"


class Conflict(ServiceError):
    """
    The request clashes with existing state (a taken room name).
    """

    status = 409
    code = "conflict"


class Superseded(Conflict):
    """
    A newer connection attempt of the same tab holds the client: this one is a stale attempt.
    """

    code = "superseded"


class TooLarge(ServiceError):
    """
    A body or frame over the configured size limit.
    """

    status = 413
    code = "too_large"


class RateLimited(ServiceError):
    """
    The client sends faster than the configured rate.
    """

    status = 429
    code = "rate_limited"
