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

    def ws_headers(self) -> dict[str, str]:
        return {"Cookie": self.cookie_header(), "Origin": self.base_url}
