"""The lean ASGI handler for `/proxy/`: Django's own, without what costs on every call.

Every sync middleware costs a thread hop per request under ASGI, the per-request
ThreadSensitiveContext pins sync work to a fresh thread, and the stock `handle()` sends
`request_started` and closes the response through `sync_to_async`: two more hops
(PERFORMANCE.md §3). The proxy view is async and touches neither the ORM nor sessions,
so it needs none of them. What this handler adds:

- no per-response error log (the request log has every attempt);
- `SERVER_READ_TIMEOUT` bounds reading the request body (408 when it runs out);
- `SERVER_WRITE_TIMEOUT` bounds each write to the client, so a client that stops
  reading cannot hold a stream open forever (a long stream that is read is not cut);
- a client that disconnects cancels the view at once, before or during the stream,
  and the relay is told so that the upstream request closes and the attempt is
  logged as 499.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.urls import set_script_prefix, set_urlconf

from proxy.pipeline import ProxyResponse

log = logging.getLogger("gptload.proxy")
TIMEOUT_BODY = b'{"error":{"message":"Request body not received in time.","type":"timeout"}}'


class ProxyHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        chain = convert_exception_to_response(self._get_response_async)  # type: ignore[attr-defined]
        if settings.ENABLE_CORS:
            # The one middleware here, async-native: CORS exactly as configured for the
            # rest of the site, and preflights answered before any proxy key is asked for.
            from corsheaders.middleware import CorsMiddleware

            chain = convert_exception_to_response(CorsMiddleware(chain))  # type: ignore[arg-type]
        self._middleware_chain = chain

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.handle(scope, receive, send)

    async def get_response_async(self, request: HttpRequest) -> HttpResponseBase:
        # Django's own also logs every 4xx/5xx through a thread; an upstream's error is
        # the provider's answer, recorded in the request log, not a server error of ours.
        set_urlconf(settings.ROOT_URLCONF)
        response: HttpResponseBase = await self._middleware_chain(request)  # type: ignore[misc]
        response._resource_closers.append(request.close)  # type: ignore[attr-defined]
        return response

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            async with asyncio.timeout(settings.SERVER_READ_TIMEOUT):
                body_file = await self.read_body(receive)
        except RequestAborted:
            return
        except TimeoutError:
            await send_plain(send, 408, TIMEOUT_BODY)
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            if error_response is not None:
                await self.send_response(error_response, send)
            return
        # Forwarded as bytes whatever their size (images in a vision request run to many
        # MB): DATA_UPLOAD_MAX_MEMORY_SIZE guards form parsing, which the proxy never does.
        request._body = body_file.read()
        writer = BoundedSend(send, settings.SERVER_WRITE_TIMEOUT)
        answered: list[HttpResponseBase] = []

        async def respond() -> None:
            response = await self.run_get_response(request)
            answered.append(response)
            await self.send_response(response, writer)

        listener = asyncio.create_task(self.listen_for_disconnect(receive))
        worker = asyncio.create_task(respond())
        try:
            await asyncio.wait([listener, worker], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await finish(worker)
            await finish(listener)
            relay = getattr(answered[0], "relay", None) if answered else None
            if relay is not None:
                await relay.aclose()
            body_file.close()

    async def send_response(self, response: HttpResponseBase, send: Any) -> None:
        """The proxy's own answers go out as they are: the upstream's raw headers, the body
        whole or chunk by chunk, and no thread hop to close them (nothing to close)."""
        if not isinstance(response, ProxyResponse):
            await super().send_response(response, send)
            return
        headers = response.raw_headers
        if response.headers:  # set by a middleware (CORS)
            headers = headers + [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                 for k, v in response.headers.items()]  # fmt: skip
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": headers})  # fmt: skip
        if response.relay is None:
            await send({"type": "http.response.body", "body": response.body})
            return
        async for chunk in response.relay:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


class BoundedSend:
    """The ASGI `send`, with a limit on how long one write may wait for the client."""

    def __init__(self, send: Any, timeout: float) -> None:
        self.send, self.timeout = send, timeout

    async def __call__(self, message: Mapping[str, Any]) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.send(message)
        except TimeoutError:
            log.info("client did not read for %s s; dropping the response", self.timeout)
            raise asyncio.CancelledError from None


async def finish(task: asyncio.Task[Any]) -> None:
    """Cancels `task` if it is still running and waits for it; its own errors are logged."""
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, RequestAborted):
        try:
            await task
        except (asyncio.CancelledError, RequestAborted):
            raise
        except Exception:
            log.exception("proxy response failed")


async def send_plain(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
