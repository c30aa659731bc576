"""
ASGI entry point: HTTP through Django, WebSockets through the messaging consumer.

`get_asgi_application()` runs first so the app registry is ready before consumers import models.
"""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from chatproject.middleware import CsrfOriginValidator, SocketAuthMiddlewareStack  # noqa: E402
from chatproject.routing import websocket_urlpatterns  # noqa: E402
from clients.scheduler import BackgroundTasks  # noqa: E402

http_app = django_asgi_app
if settings.SERVE_STATIC:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    http_app = ASGIStaticFilesHandler(django_asgi_app)

router = ProtocolTypeRouter(
    {
        "http": http_app,
        # The Origin as Django's CSRF check compares it (scheme, host and port), not channels'
        # AllowedHostsOriginValidator (host name only).
        "websocket": CsrfOriginValidator(
            SocketAuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)
# Heartbeat and periodic cleanup run inside every server process; nothing else to start.
application = BackgroundTasks(router)

if settings.SERVER_GC_THRESHOLDS:
    gc.freeze()
    gc.set_threshold(*settings.SERVER_GC_THRESHOLDS)
