"""A small cookie-keeping JSON HTTP session (standard library, run in a thread from asyncio)."""

import asyncio
import http.cookiejar
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class HttpSession:
    """
    Session auth like a browser: cookies, the CSRF token header and a Referer on unsafe calls.
    """

    def __init__(
        self, base_url: str, timeout: float = 30, alternates: list[str] | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # Servers of the same deployment to fail over to when one refuses connections (cookies
        # are per host name, so a session on 127.0.0.1 holds on every port).
        self.urls = [url.rstrip("/") for url in alternates or []] or [self.base_url]
        self._current = 0
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def cookie(self, name: str) -> str | None:
        """
        The value of cookie `name`, if set.
        """
        return next((c.value for c in self.jar if c.name == name), None)

    def cookie_header(self) -> str:
        """
        All cookies as one Cookie header value (for the WebSocket handshake).
        """
        return "; ".join(f"{c.name}={c.value}" for c in self.jar)

    def request_sync(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """
        Make one JSON call; returns (status, the decoded JSON body, the text of a non-JSON body,
        or None for an empty one).
        """
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Referer": self.base_url + "/"}
        token = self.cookie("csrftoken")
        if token:
            headers["X-CSRFToken"] = token
        for attempt in range(len(self.urls)):
            base = self.urls[self._current]
            req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
            try:
                with self.opener.open(req, timeout=self.timeout) as resp:
                    body, status = resp.read(), resp.status
                break
            except urllib.error.HTTPError as err:
                body, status = err.read(), err.code
                break
            except (urllib.error.URLError, ConnectionError):
                # Refused or reset before an answer: try the next server. Every call of the
                # protocol is safe to repeat (sends are deduplicated by client_msg_id).
                self._current = (self._current + 1) % len(self.urls)
                if attempt == len(self.urls) - 1:
                    raise
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, body.decode(errors="replace")

    async def request(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """
        `request_sync` without blocking the event loop.
        """
        return await asyncio.to_thread(self.request_sync, method, path, payload)

    def login_sync(self, username: str, password: str) -> None:
        """
        Log in through Django's login form; raises PermissionError if refused.
        """
        self.request_sync("GET", "/accounts/login/")
        form = urllib.parse.urlencode(
            {
                "username": username,
                "password": password,
                "csrfmiddlewaretoken": self.cookie("csrftoken") or "",
            }
        ).encode()
        req = urllib.request.Request(
            self.base_url + "/accounts/login/",
            data=form,
            method="POST",
            headers={"Referer": self.base_url + "/accounts/login/"},
        )
        with self.opener.open(req, timeout=self.timeout):
            pass
        if not self.cookie("sessionid"):
            raise PermissionError(f"login refused for {username!r}")

    async def login(self, username: str, password: str) -> None:
        """
        `login_sync` without blocking the event loop.
        """
        await asyncio.to_thread(self.login_sync, username, password)
