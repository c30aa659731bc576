"""
Real servers for tests: the shared harness, plus a blocking HTTP session for test code.
"""

from harness.deployment import Deployment, Server, free_port
from relayclient.http import HttpSession

__all__ = ["Deployment", "Server", "Session", "free_port"]


class Session(HttpSession):
    """
    A logged-in browser-like HTTP session against a real server (the client library's own
    session, with blocking calls for tests).
    """

    request = HttpSession.request_sync  # type: ignore[assignment]
    login = HttpSession.login_sync  # type: ignore[assignment]

    def ws_headers(self, origin: str | None = None) -> dict[str, str]:
        """
        The handshake headers of a page on `origin` (default: the session's server; a socket to
        another server of the deployment needs that server's own origin).
        """
        return {"Cookie": self.cookie_header(), "Origin": origin or self.base_url}
