"""The ASGI application: `uvicorn gptload.asgi:application` or `daphne gptload.asgi:application`.

HTTP goes to Django (`/proxy/` to its lean handler), the WebSocket of the live dashboard
to its consumer; lifespan events start and stop the per-process services.
"""

from __future__ import annotations

import os
from typing import Any

from gptload.lib.env import load_settings_or_exit

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gptload.settings")
load_settings_or_exit()

from channels.routing import ProtocolTypeRouter  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402

django_application = get_asgi_application()

from gptload.lib.httpserver import read_within  # noqa: E402
from gptload.lib.lifespan import lifespan  # noqa: E402 - needs the apps loaded
from proxy.handler import ProxyHandler  # noqa: E402

proxy_application = ProxyHandler()


from urllib.parse import urlsplit  # noqa: E402

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import URLRouter  # noqa: E402
from channels.security.websocket import WebsocketDenier  # noqa: E402
from django.conf import settings  # noqa: E402
from django.urls import path  # noqa: E402

from logs.consumers import DashboardConsumer  # noqa: E402


class SameOrigin:
    """WebSocket handshakes from the console's own pages only: the `Origin` must name the
    host the request came to (or be one of `CSRF_TRUSTED_ORIGINS`, behind a proxy that
    rewrites `Host`). `ALLOWED_HOSTS` is `*` for the proxy's sake, so channels' own
    validator would let any site's page open a signed-in operator's socket."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin", b"").decode("latin-1").lower()
        host = headers.get(b"host", b"").decode("latin-1").lower()
        trusted = {o.lower() for o in settings.CSRF_TRUSTED_ORIGINS}
        if origin and (urlsplit(origin).netloc == host or origin in trusted):
            return await self.app(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)


websockets = SameOrigin(
    AuthMiddlewareStack(URLRouter([path("ws/dashboard/", DashboardConsumer.as_asgi())]))
)
router = ProtocolTypeRouter(
    {"http": django_application, "websocket": websockets, "lifespan": lifespan}
)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """`/proxy/…` straight to the proxy's lean handler (its cost is the product); every
    other request, and lifespan events, through channels' router to Django."""
    if scope["type"] != "http":
        await router(scope, receive, send)
    elif scope["path"].startswith("/proxy/"):
        await proxy_application(scope, receive, send)  # it bounds its own body
    else:
        await router(scope, read_within(receive, send, settings.SERVER_READ_TIMEOUT), send)
