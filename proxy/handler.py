"""The ASGI application for `/proxy/`: the least that serves the proxy's ninja operation.

Django's ASGI handler does a great deal per request that the proxy never uses, and the
proxy is the path whose cost is the product: a `SpooledTemporaryFile` for the body, a
full `META` dict, URL resolution, the middleware adapters, the `request_started` and
`request_finished` signals and a thread hop to close each response (PERFORMANCE.md §3;
measured here, these were a third of the gateway's CPU per call). This handler keeps
what matters and drops the rest:

- the client's key is checked from the headers before the body is read (`admit`): a
  stranger's body is never buffered, and the refusal closes the connection;
- the body is read into memory (it is forwarded as bytes anyway), up to
  `MAX_REQUEST_BODY_MB` (413, in the provider's shape, as soon as it is known to be
  bigger) and within `SERVER_READ_TIMEOUT` (408 when it runs out);
- the request is a `ProxyRequest`, an `ASGIRequest` whose `META` is built only if
  something asks for it (CORS does, the pipeline does not);
- the ninja operation is called directly: `/proxy/{group}/{path}` needs no resolver
  (`group` and `path` ride on the request);
- the one middleware is django-cors-headers' (async-native), when `ENABLE_CORS` is on,
  so that `/proxy/` follows the same CORS configuration as the rest of the site and
  preflights are answered before any proxy key is asked for;
- a client that disconnects cancels the request at once, before or during the stream
  (the relay then closes the upstream and logs the attempt);
- `SERVER_WRITE_TIMEOUT` bounds each write: a client that stops reading cannot hold a
  stream open for ever, while a long stream that is read is never cut. One watchdog per
  process checks the reads and writes in progress once a second, rather than a timer
  per request or per chunk;
- every answer carries `nosniff` and a sandboxing CSP, and never an upstream's cookies
  (`ANSWER_SECURITY`): whatever an upstream sends is served from gptload's own origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Awaitable, Callable
from functools import cached_property
from typing import Any

from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from gptload.lib.providers.headers import ANSWER_SECURITY
from proxy.pipeline import Opened, ProxyError, ProxyResponse, admit

log = logging.getLogger("gptload.proxy")
TIMEOUT_BODY = b'{"error":{"message":"Request body not received in time.","type":"timeout"}}'
NOT_FOUND_BODY = (
    b'{"error":{"message":"Use /proxy/{group}/{the provider\'s own path}.",'
    b'"type":"not_found_error","code":"not_found_error"}}'
)
INTERNAL_BODY = (
    b'{"error":{"message":"gptload failed to handle this request.",'
    b'"type":"internal_error","code":"internal_error"}}'
)
View = Callable[[HttpRequest], Awaitable[HttpResponseBase]]
DRAIN = 1024 * 1024  # bytes of a refused request's body read and dropped (see _drain)


class Disconnected(Exception):
    """The client went away before its request body was complete."""


class ProxyRequest(ASGIRequest):
    """An `ASGIRequest` made from the scope and the body, with `META` built on first use."""

    admitted: Opened | None = None  # the group the headers' key opens, and its access key
    refusal: ProxyError | None = None  # refused before the body was read

    def __init__(self, scope: dict[str, Any], body: bytes, group: str, path: str) -> None:
        self.scope = scope
        self.method = scope["method"]
        self.path = self.path_info = scope["path"]
        self.script_name = ""
        self.resolver_match = None
        self._body = body
        self._read_started = False
        self._post_parse_error = False
        self.proxy_route = (group, path)

    @cached_property
    def META(self) -> dict[str, Any]:  # type: ignore[override]
        full = ASGIRequest(self.scope, io.BytesIO(self._body))
        self._encoding, self.content_type = full.encoding, full.content_type
        self.content_params = full.content_params
        return full.META


class Exchange:
    """One request in flight: whether it ended because the client went away or was too
    slow to send its body, and the read or write in progress (when it began), for the
    watchdog."""

    __slots__ = ("gone", "late", "reading_since", "task", "writing_since")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.gone = self.late = False
        self.reading_since = self.writing_since = 0.0


class ProxyHandler:
    def __init__(self) -> None:
        self._chain: View | None = None
        self._exchanges: set[Exchange] = set()
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def chain(self) -> View:
        if self._chain is None:
            self._chain = self._build_chain()
        return self._chain

    def _build_chain(self) -> View:
        from django.urls import resolve

        operation: View = resolve("/proxy/").func  # the ninja operation's view
        if not settings.ENABLE_CORS:
            return operation
        from corsheaders.middleware import CorsMiddleware

        return CorsMiddleware(operation)  # type: ignore[return-value]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        route = scope["path"].split("/", 3)  # "", "proxy", group, path
        if len(route) < 4 or not route[2]:
            await send_plain(send, 404, NOT_FOUND_BODY)
            return
        admitted: Opened | None = None
        refusal: ProxyError | None = None
        if scope["method"] != "OPTIONS" or not settings.ENABLE_CORS:  # preflights: no key
            try:
                admitted = await admit(scope, route[2])
            except ProxyError as error:
                refusal = error
        body = b""
        exchange = Exchange(asyncio.current_task())  # type: ignore[arg-type]
        declared = content_length(scope)
        if refusal is None:
            try:
                body = await self._read_body(receive, exchange, declared)
            except Disconnected:
                return
            except asyncio.CancelledError:
                if not exchange.late:
                    raise
                exchange.task.uncancel()
                await send_plain(send, 408, TIMEOUT_BODY)
                return
            except ProxyError as error:
                refusal = error
        request = ProxyRequest(scope, body, route[2], route[3])
        if refusal is not None:
            request.refusal = refusal
            refused = await self.chain(request)
            if not await self._drain(receive, exchange, declared):
                # The rest of the body stays unread: the connection cannot carry another
                # request, and the server closes it after this answer.
                refused.raw_headers.append((b"connection", b"close"))  # type: ignore[attr-defined]
            await self.send_response(refused, send, exchange)
            return
        request.admitted = admitted
        watcher = asyncio.create_task(self._watch_disconnect(receive, exchange))
        response: HttpResponseBase | None = None
        try:
            try:
                response = await self.chain(request)
            except Exception:  # a bug of ours (the pipeline answers its own faults itself)
                log.exception("proxy request failed before the pipeline")
                await send_plain(send, 500, INTERNAL_BODY)
                return
            await self.send_response(response, send, exchange)
        except asyncio.CancelledError:
            if not exchange.gone:
                raise
            exchange.task.uncancel()
        finally:
            watcher.cancel()
            relay = getattr(response, "relay", None)
            if relay is not None:
                relay.close()

    async def _read_body(self, receive: Any, exchange: Exchange, declared: int | None) -> bytes:
        """The whole body, within MAX_REQUEST_BODY (413 above it, before reading anything
        when `content-length` says so) and SERVER_READ_TIMEOUT (the watchdog cancels a
        read that takes longer: no timer per request)."""
        limit = settings.MAX_REQUEST_BODY
        if declared is not None and declared > limit:
            raise too_large()
        self._watch(exchange)
        exchange.reading_since = asyncio.get_running_loop().time()
        try:
            return await read_body(receive, limit)
        finally:
            exchange.reading_since = 0.0
            self._exchanges.discard(exchange)

    async def _drain(self, receive: Any, exchange: Exchange, declared: int | None) -> bool:
        """Reads and drops what is left of a refused request's body, when it is small
        (`DRAIN`), so that the refusal reaches the client intact: a server that closes a
        connection with unread bytes makes its kernel reset it, and the client's kernel
        then discards the answer not yet read. Whether the body was read to its end."""
        if declared is not None and declared > DRAIN:
            return False
        self._watch(exchange)
        exchange.reading_since = asyncio.get_running_loop().time()
        room = DRAIN
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
                room -= len(message.get("body", b""))
                if not message.get("more_body", False):
                    return True
                if room < 0:
                    return False
        except asyncio.CancelledError:
            if not exchange.late:
                raise
            exchange.task.uncancel()
            return False
        finally:
            exchange.reading_since = 0.0
            self._exchanges.discard(exchange)

    async def _watch_disconnect(self, receive: Any, exchange: Exchange) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        exchange.gone = True
        exchange.task.cancel()

    async def send_response(
        self, response: HttpResponseBase, send: Any, exchange: Exchange
    ) -> None:
        """The proxy's own answers go out as they are: the upstream's raw headers, the body
        whole or chunk by chunk; anything else (a refusal of ninja's) as Django would."""
        if isinstance(response, ProxyResponse):
            headers, body = response.raw_headers, response.body
            if extra := response.extra_headers:  # set by a middleware (CORS)
                headers = headers + extra
        else:
            body = getattr(response, "content", b"")
            headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                       for k, v in response.headers.items()]  # fmt: skip
            headers.append((b"content-length", str(len(body)).encode()))
        headers = [*headers, *ANSWER_SECURITY]
        self._watch(exchange)
        try:
            await self._write(send, exchange, {"type": "http.response.start",
                                               "status": response.status_code, "headers": headers})  # fmt: skip
            relay = getattr(response, "relay", None)
            if relay is None:
                await self._write(send, exchange, {"type": "http.response.body", "body": body})
                return
            async for chunk in relay:
                await self._write(send, exchange, {"type": "http.response.body", "body": chunk,
                                                   "more_body": True})  # fmt: skip
            if relay.cut:
                # Left unfinished, so that the server drops the connection and the client
                # sees a broken answer, not a complete one (the server logs one line).
                return
            await self._write(send, exchange, {"type": "http.response.body", "body": b""})
        finally:
            self._exchanges.discard(exchange)

    def _watch(self, exchange: Exchange) -> None:
        self._exchanges.add(exchange)
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_exchanges())

    async def _write(self, send: Any, exchange: Exchange, message: dict[str, Any]) -> None:
        exchange.writing_since = asyncio.get_running_loop().time()
        await send(message)
        exchange.writing_since = 0.0

    async def _watch_exchanges(self) -> None:
        """Cancels the requests whose client has not sent its body within
        SERVER_READ_TIMEOUT, or not taken a write for SERVER_WRITE_TIMEOUT."""
        loop = asyncio.get_running_loop()
        while self._exchanges:
            # Read each round: a watchdog outlives the requests it was started for.
            read_limit, write_limit = settings.SERVER_READ_TIMEOUT, settings.SERVER_WRITE_TIMEOUT
            await asyncio.sleep(min(1.0, read_limit / 2, write_limit / 2))
            now = loop.time()
            for exchange in list(self._exchanges):
                if exchange.reading_since and now - exchange.reading_since > read_limit:
                    exchange.late = True
                    exchange.reading_since = 0.0
                    exchange.task.cancel()
                elif exchange.writing_since and now - exchange.writing_since > write_limit:
                    log.info("client did not read for %s s; dropping the response", write_limit)
                    exchange.gone = True
                    exchange.writing_since = 0.0
                    exchange.task.cancel()


async def read_body(receive: Any, room: int) -> bytes:
    """The rest of a body; refused (413) as soon as it outgrows `room` bytes."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        if chunk := message.get("body"):
            room -= len(chunk)
            if room < 0:
                raise too_large()
            parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def content_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def too_large() -> ProxyError:
    return ProxyError(413, f"Request body larger than {settings.MAX_REQUEST_BODY_MB} MiB "
                      "(MAX_REQUEST_BODY_MB).", "invalid_request_error")  # fmt: skip


async def send_plain(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    with contextlib.suppress(OSError):
        await send({"type": "http.response.body", "body": body})
