"""
The WebSocket side's session and auth middleware: channels' AuthMiddlewareStack, less a wrapper
around every frame sent.
"""

from typing import Any

from channels.auth import AuthMiddleware
from channels.sessions import CookieMiddleware, InstanceSessionWrapper


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
