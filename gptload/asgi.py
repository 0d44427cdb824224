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

from gptload.lib.lifespan import lifespan  # noqa: E402 - needs the apps loaded
from proxy.handler import ProxyHandler  # noqa: E402

proxy_application = ProxyHandler()


from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402

from logs.consumers import DashboardConsumer  # noqa: E402

websockets = AllowedHostsOriginValidator(
    AuthMiddlewareStack(URLRouter([path("ws/dashboard/", DashboardConsumer.as_asgi())]))
)
router = ProtocolTypeRouter(
    {"http": django_application, "websocket": websockets, "lifespan": lifespan}
)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """`/proxy/…` straight to the proxy's lean handler (its cost is the product); every
    other request, and lifespan events, through channels' router to Django."""
    if scope["type"] == "http" and scope["path"].startswith("/proxy/"):
        await proxy_application(scope, receive, send)
    else:
        await router(scope, receive, send)
