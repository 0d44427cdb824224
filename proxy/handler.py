"""The lean ASGI handler for `/proxy/`: Django's own, without the sync middleware stack.

Every sync middleware costs a thread hop per request under ASGI, and the per-request
ThreadSensitiveContext pins sync work to a fresh thread (PERFORMANCE.md §3). The proxy
view is async and touches neither the ORM nor sessions, so it needs neither.
"""

from __future__ import annotations

from typing import Any

from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response


class ProxyHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        self._middleware_chain = convert_exception_to_response(self._get_response_async)  # type: ignore[attr-defined]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.handle(scope, receive, send)
