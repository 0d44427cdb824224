"""Time limits uvicorn does not set: on a request's headers, and on a request's body.

uvicorn times out an idle keep-alive connection, but not a connection that never
finishes its headers (it waits for them for ever: a few hundred such sockets hold a
worker's file descriptors), nor a body sent a byte a minute. `serve` runs uvicorn with
`TimedHttpTools`, which closes a connection whose request line and headers are not
complete within `SERVER_READ_TIMEOUT` of their first byte (or of the connection's
opening), and `gptload.asgi` bounds every body with `read_within()` (the proxy's handler
bounds its own).
"""

from __future__ import annotations

import asyncio
from asyncio import TimerHandle
from typing import Any

from django.conf import settings
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

TIMEOUT_BODY = b"Request not received in time."


class TimedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's head."""

    _head_timer: TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # a further request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(settings.SERVER_READ_TIMEOUT, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request in progress (pipelined data arrived meanwhile): not idle
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(TIMEOUT_BODY), TIMEOUT_BODY)
        )
        self.transport.close()


def read_within(receive: Any, send: Any, seconds: float) -> Any:
    """`receive` for an ASGI HTTP request whose body must arrive within `seconds`: past
    that, the client gets 408 and the application a disconnect (Django then stops)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    reading = True

    async def timed_receive() -> dict[str, Any]:
        nonlocal reading
        if not reading:
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                message: dict[str, Any] = await receive()
        except TimeoutError:
            reading = False
            await send({"type": "http.response.start", "status": 408, "headers": [
                (b"content-type", b"text/plain"), (b"connection", b"close"),
                (b"content-length", b"%d" % len(TIMEOUT_BODY))]})  # fmt: skip
            await send({"type": "http.response.body", "body": TIMEOUT_BODY})
            return {"type": "http.disconnect"}
        if message["type"] != "http.request" or not message.get("more_body", False):
            reading = False
        return message

    return timed_receive
