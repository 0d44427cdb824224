"""A fake OpenAI / Anthropic / Gemini upstream: a real aiohttp server on a loopback port.

Tests point gptload groups at `FakeProvider.url` and choose what each upstream API key
does with `provider.behave(key, Behaviour(...))`: answer normally, fail with a status in
the provider's own error shape, wait before the first byte, space stream events, cut a
stream, or hold it open after its last event. `provider.limit(key, Quota(...))` gives a
key a rate limit of its own, announced in every answer's headers as OpenAI or Anthropic
announce theirs, and enforced with 429 once spent. Every request is recorded
(`provider.requests`) with the credential it carried.

Like the real providers, it compresses what it answers (JSON and streams alike) in the
coding the request's Accept-Encoding lets it, br first: see `tests/fakeprovider_encoding.py`.
`FakeProvider(compress=False)` or `Behaviour(compress=False)` turns that off.

The answers, in `tests/fakeprovider_responses.py` beside this file, are complete enough
for the real SDKs (openai, anthropic, google-genai) to parse them, and token usage is
deterministic: `PROMPT_TOKENS` in, one token per content chunk out (`COMPLETION_TOKENS`
with the default `DEFAULT_EVENTS` chunks). The errors, in each provider's shape, are in
`tests/fakeprovider_errors.py`. Their public names are importable from here.

Run standalone for a benchmark: `python tests/fakeprovider.py --port 9000` (add
`--no-compress` to leave answers uncompressed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

if not __package__:
    # Run as a script (`python tests/fakeprovider.py`): the project root is not on
    # sys.path then, and the answers below are imported as `tests.…` either way.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.background import BackgroundServer
from tests.fakeprovider_encoding import CODINGS, Coding, Encoder, choose_coding, encoder
from tests.fakeprovider_errors import (
    INVALID_KEY_MESSAGE,
    REASONS,
    UNREGISTERED_CALLER,
    Family,
    duration,
    error_body,
    openai_ratelimit_headers,
)
from tests.fakeprovider_responses import (
    ANTHROPIC_MODELS,
    COMPLETION_TOKENS,
    DEFAULT_EVENTS,
    EMBEDDING_DIMENSIONS,
    GEMINI_MODELS,
    OPENAI_MODELS,
    PROMPT_TOKENS,
    TOTAL_TOKENS,
    Frame,
    anthropic_messages,
    anthropic_models,
    chunk_text,
    full_text,
    gemini_generate,
    gemini_models,
    gemini_stream,
    openai_chat,
    openai_embeddings,
    openai_models,
    openai_responses,
)

__all__ = [
    "ANTHROPIC_MODELS",
    "CODINGS",
    "COMPLETION_TOKENS",
    "DEFAULT_EVENTS",
    "DEFAULT_MODEL",
    "EMBEDDING_DIMENSIONS",
    "GEMINI_MODELS",
    "INVALID_KEY_MESSAGE",
    "MALFORMED_EVENTS",
    "OPENAI_MODELS",
    "PROMPT_TOKENS",
    "TOTAL_TOKENS",
    "Behaviour",
    "Coding",
    "FakeProvider",
    "Quota",
    "Received",
    "choose_coding",
    "chunk_text",
    "error_body",
    "full_text",
    "main",
    "openai_ratelimit_headers",
    "running_provider",
]

DEFAULT_MODEL = "fake-model"

# What `Behaviour.malformed_sse` sends first: JSON cut short (once where a usage reader
# looks), a line that names no field, and bytes that are not UTF-8.
MALFORMED_EVENTS = (
    b'data: {"choices": [{"index": 0, "delta": {"content": "x\n\n',
    b'data: {"usage": {"prompt_tokens": 3, "completion_tokens"\n\n',
    b"this line names no field\n\n",
    b"data: \xff\xfe\xfd not utf-8\n\n",
)

KeySource = Literal["authorization", "x-api-key", "x-goog-api-key", "query"]


@dataclass(frozen=True)
class Behaviour:
    """What the fake provider does for requests carrying one key.

    - `status` >= 400 answers that status with the provider's error JSON; `body`, when
      set, is answered raw (as JSON content) with `status`, whatever it is.
    - `retry_after` and `headers` are added to every answer, errors and successes alike.
    - `first_byte_delay` waits before anything is sent, headers included.
    - `events` is the number of content chunks (and output tokens); `event_interval`
      separates consecutive content chunks (framing events go out with their neighbours).
    - `drop_after=N` closes the connection right after a stream's N-th content chunk
      (0: after the headers and any preamble events; N == `events`: before the closing
      events; more: never). On a non-stream request it closes the connection unanswered.
    - `reset` makes every cut a TCP reset (RST) rather than a clean close; alone, it
      resets the connection before anything is sent (after `first_byte_delay`).
    - `cut_body` sends a plain (non-stream) answer's headers and the first half of its
      body, then closes the connection; `body_delay` instead waits that many seconds
      there before sending the rest.
    - `malformed_sse` opens an event stream with events no parser can read (JSON cut
      short, one mentioning usage; a line with no field name; bytes that are not
      UTF-8), `MALFORMED_EVENTS`, before its usual events, which follow unchanged.
    - `invalid_key_message` answers 400 "API key not valid…", as Gemini does for bad keys,
      in the provider's error shape.
    - `compress=False` answers uncompressed whatever the client accepts, like an upstream
      that never compresses (no Vary either); `codings` is what the provider offers, in
      its order of preference, when it does compress (e.g. `("gzip",)`, Google-like).
    - `tail_delay` holds a stream open that many seconds after its final frame (OpenAI's
      `data: [DONE]`, Responses' `response.completed`, Anthropic's `message_stop`,
      Gemini's last chunk or, without alt=sse, the array's closing bracket) before
      ending the body, as real providers sometimes do; a client that stops reading at
      the final event then closes the connection first (see `Received.tail_cut`).
    - `ratelimit_headers` adds OpenAI's `x-ratelimit-*` headers to OpenAI-family answers
      (requests exhausted on a 429, resetting after `retry_after`, if numeric, else 1 s);
      other families ignore it.
    """

    status: int = 200
    retry_after: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    first_byte_delay: float = 0
    event_interval: float = 0
    events: int = DEFAULT_EVENTS
    drop_after: int | None = None
    invalid_key_message: bool = False
    compress: bool = True
    codings: tuple[Coding, ...] = CODINGS
    tail_delay: float = 0
    ratelimit_headers: bool = False
    reset: bool = False
    cut_body: bool = False
    body_delay: float = 0
    malformed_sse: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.codings) - set(CODINGS)
        if unknown:
            raise ValueError(f"unknown codings {sorted(unknown)}; known: {CODINGS}")


@dataclass(frozen=True)
class Quota:
    """A rate limit of one key, as a provider keeps it: `requests` calls and `tokens`
    tokens (`TOTAL_TOKENS` a call) per `window` seconds, the window starting at the
    key's first call after the last one ended (None: no such limit).

    Every answer within the quota announces what is left, in the headers of `style`:
    OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (resets as
    durations, `1s`, `6m0s`) or Anthropic's `anthropic-ratelimit-{requests,tokens}-
    {limit,remaining,reset}` (resets as RFC 3339 times). A call beyond it is answered 429
    with `Retry-After`, and the same headers saying nothing is left.
    """

    requests: int | None = None
    tokens: int | None = None
    window: float = 60.0
    style: Literal["openai", "anthropic"] = "openai"


@dataclass
class Spent:
    """What a key has spent of its quota in the current window."""

    began: float = 0.0
    requests: int = 0
    tokens: int = 0


@dataclass
class Received:
    """One request as the fake provider saw it, and how it ended.

    `headers` looks names up case-insensitively. `key` is the credential the provider
    would read, from `key_source`; `credentials` holds every credential present.
    `encoding` is the content coding the answer was sent in (None: uncompressed).

    `finished` says the answer went out whole (a stream: once its final frame is
    written), `dropped` that `drop_after` cut it, `disconnected` that the client left first.
    For streams, `terminal_sent` says the final frame was written. A client that closes
    the connection after that, while `tail_delay` holds the body open, had the whole
    answer, and real SDKs do close there: that sets `tail_cut`, not `disconnected`, is
    not counted in `FakeProvider.disconnects`, and the request stays `finished`. A close
    before the final frame is a disconnect, as without `tail_delay`.
    """

    index: int
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDictProxy[str]
    body: bytes
    json: Any
    key: str | None
    key_source: KeySource | None
    credentials: dict[KeySource, str]
    family: Family
    stream: bool
    started: float
    ended: float | None = None  # when its handler finished (time.monotonic())
    status: int | None = None
    encoding: Coding | None = None
    events_sent: int = 0
    terminal_sent: bool = False
    finished: bool = False
    dropped: bool = False
    disconnected: bool = False
    tail_cut: bool = False


class FakeProvider(BackgroundServer):
    """The fake upstream, served from its own thread and event loop.

    Use it as a context manager, or `start()` / `stop()`. All methods are thread-safe.
    `compress=False` leaves every answer uncompressed, whatever the behaviours say.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        require_key: bool = True,
        record: bool = True,
        compress: bool = True,
    ) -> None:
        self.host = host
        self.require_key = require_key
        self.record = record
        self.compress = compress
        self._port = port
        self._changed = threading.Condition()
        self._requests: list[Received] = []
        self._behaviours: dict[str, Behaviour] = {}
        self._default = Behaviour()
        self._quotas: dict[str, Quota] = {}
        self._spent: dict[str, Spent] = {}
        self._disconnects = 0
        self._in_progress = 0
        self._count = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT`, valid once started."""
        if self._thread is None:
            raise RuntimeError("the fake provider is not started")
        return f"http://{self.host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> FakeProvider:
        """Starts serving; returns once the port is bound. Raises what binding raised."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []
        self._loop = asyncio.new_event_loop()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._serve, args=(ready, failure), name="fakeprovider", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stops serving, cutting any request still in progress."""
        if self._thread is None or self._loop is None:
            return
        self._stopping = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def _serve(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._bind())
        except BaseException as exc:  # handed to start() in the caller's thread
            failure.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.close()

    async def _bind(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._handle)
        # handler_cancellation: a client that goes away cancels its handler, which is how
        # a disconnect during `first_byte_delay` or between events is noticed.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    # -- behaviour and records -------------------------------------------------------

    def behave(self, key: str, behaviour: Behaviour) -> None:
        """Requests carrying `key` get `behaviour` from now on."""
        with self._changed:
            self._behaviours[key] = behaviour

    def behave_default(self, behaviour: Behaviour) -> None:
        """Requests whose key has no behaviour of its own get `behaviour`."""
        with self._changed:
            self._default = behaviour

    def limit(self, key: str, quota: Quota | None) -> None:
        """Requests carrying `key` are counted against `quota` from now on (None: no
        quota); its window starts afresh."""
        with self._changed:
            self._spent.pop(key, None)
            if quota is None:
                self._quotas.pop(key, None)
            else:
                self._quotas[key] = quota

    def charge(self, key: str | None) -> tuple[bool, dict[str, str]]:
        """Counts a call on `key` against its quota: whether it is within it, and the
        headers announcing what is left (none without a quota)."""
        with self._changed:
            quota = self._quotas.get(key or "")
            if quota is None or key is None:
                return True, {}
            now = time.time()
            spent = self._spent.setdefault(key, Spent(now))
            if now >= spent.began + quota.window:
                spent.began, spent.requests, spent.tokens = now, 0, 0
            within = (quota.requests is None or spent.requests < quota.requests) and (
                quota.tokens is None or spent.tokens < quota.tokens
            )
            if within:
                spent.requests += 1
                spent.tokens += TOTAL_TOKENS
            headers = quota_headers(quota, spent, now)
            if not within:
                headers["Retry-After"] = str(max(1, math.ceil(spent.began + quota.window - now)))
            return within, headers

    def behaviour_for(self, key: str | None) -> Behaviour:
        with self._changed:
            return self._behaviours.get(key or "", self._default)

    @property
    def requests(self) -> list[Received]:
        """A copy of the list of requests received so far, oldest first."""
        with self._changed:
            return list(self._requests)

    def requests_for(self, key: str) -> list[Received]:
        return [r for r in self.requests if r.key == key]

    def keys_used(self) -> list[str]:
        """The key of each request received, in order (requests without one are left out)."""
        return [r.key for r in self.requests if r.key is not None]

    @property
    def disconnects(self) -> int:
        """How many requests the client abandoned before their answer was complete."""
        with self._changed:
            return self._disconnects

    @property
    def in_progress(self) -> int:
        """How many requests are being answered right now (their handler still runs)."""
        with self._changed:
            return self._in_progress

    def clear(self) -> None:
        """Forgets the requests received and the disconnect count."""
        with self._changed:
            self._requests.clear()
            self._disconnects = 0

    def reset(self) -> None:
        """`clear()`, and every key back to the default OK behaviour."""
        with self._changed:
            self._requests.clear()
            self._disconnects = 0
            self._behaviours.clear()
            self._default = Behaviour()
            self._quotas.clear()
            self._spent.clear()

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Waits until `count` requests were received; False if `timeout` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._requests) >= count, timeout)

    def wait_for_disconnects(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Waits until `count` client disconnects were seen; False if `timeout` passed first.

        A disconnect reaches the server a moment after the client closes, so tests that
        check "the upstream request was closed" wait here rather than read `disconnects`.
        """
        with self._changed:
            return self._changed.wait_for(lambda: self._disconnects >= count, timeout)

    def wait_until(self, condition: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Waits until `condition()` holds; False if `timeout` passed first.

        It is checked again whenever a request arrives, sends its final frame or ends, e.g.
        `provider.wait_until(lambda: provider.requests[0].tail_cut)`.
        """
        with self._changed:
            return self._changed.wait_for(condition, timeout)

    def _note(self, received: Received) -> None:
        if self.record:
            with self._changed:
                self._requests.append(received)
                self._changed.notify_all()

    def _note_change(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _note_disconnect(self, received: Received) -> None:
        if self._stopping or received.disconnected:
            return
        with self._changed:
            received.disconnected = True
            self._disconnects += 1
            self._changed.notify_all()

    # -- serving ---------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        credentials = find_credentials(request)
        family, answer = route(request.method, request.path, credentials, request.headers)
        key_source = next((s for s in KEY_ORDER[family] if s in credentials), None)
        key = credentials[key_source] if key_source is not None else None
        payload = parse_json(body)
        received = Received(
            index=next(self._count),
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            body=body,
            json=payload,
            key=key,
            key_source=key_source,
            credentials=credentials,
            family=family,
            stream=is_stream(request, payload),
            started=time.monotonic(),
        )
        self._note(received)
        with self._changed:
            self._in_progress += 1
        behaviour = self.behaviour_for(key)
        call = Call(
            request,
            received,
            behaviour,
            self._note_disconnect,
            self.compress and behaviour.compress,
            self._note_change,
        )
        try:
            response = await self._answer(call, answer)
            received.finished = not (received.dropped or received.disconnected)
            return response
        except asyncio.CancelledError:
            # handler_cancellation: the client closed the connection while the handler
            # waited (a delay, an event interval or the tail).
            call.client_left()
            raise
        finally:
            received.ended = time.monotonic()
            with self._changed:
                self._in_progress -= 1
            self._note_change()

    async def _answer(self, call: Call, answer: Answer | None) -> web.StreamResponse:
        response = await self._reply(call, answer)
        behaviour = call.behaviour
        if (behaviour.cut_body or behaviour.body_delay) and isinstance(response, web.Response):
            return await call.in_halves(response)
        return response

    async def _reply(self, call: Call, answer: Answer | None) -> web.StreamResponse:
        behaviour = call.behaviour
        if behaviour.first_byte_delay:
            await asyncio.sleep(behaviour.first_byte_delay)
        if behaviour.reset and behaviour.drop_after is None and not behaviour.cut_body:
            return call.drop(web.StreamResponse())
        if answer is None:
            return call.error(404, f"Invalid URL ({call.request.method} {call.request.path})")
        if call.received.key is None and self.require_key:
            return call.missing_key()
        if behaviour.invalid_key_message:
            return call.error(400, INVALID_KEY_MESSAGE, invalid_key=True)
        within, call.quota_headers = self.charge(call.received.key)
        if not within:
            return call.error(429)
        if behaviour.body is not None:
            return call.raw(behaviour.status, behaviour.body)
        if behaviour.status >= 400:
            return call.error(behaviour.status)
        if behaviour.drop_after is not None and not call.received.stream:
            return call.drop(web.StreamResponse())
        return await answer(call)


Answer = Callable[["Call"], Awaitable[web.StreamResponse]]


class Call:
    """One request being answered: its record, its behaviour and the ways to reply."""

    def __init__(
        self,
        request: web.Request,
        received: Received,
        behaviour: Behaviour,
        on_disconnect: Callable[[Received], None],
        compress: bool = True,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.request = request
        self.received = received
        self.behaviour = behaviour
        self.on_disconnect = on_disconnect
        self.on_change = on_change
        self.compress = compress
        self.coding: Coding | None = (
            choose_coding(request.headers.get("Accept-Encoding"), behaviour.codings)
            if compress
            else None
        )
        self.created = int(time.time())
        self.quota_headers: dict[str, str] = {}
        payload = received.json if isinstance(received.json, dict) else {}
        self.body: dict[str, Any] = payload
        gemini = GEMINI_GENERATE.match(request.path)
        self.model = str(gemini["model"] if gemini else payload.get("model") or DEFAULT_MODEL)

    @property
    def events(self) -> int:
        return max(self.behaviour.events, 0)

    def id(self, prefix: str) -> str:
        return f"{prefix}{self.received.index:08d}"

    def headers(self, status: int | None = None) -> dict[str, str]:
        """The headers every answer with `status` (default: the behaviour's) carries."""
        status = self.behaviour.status if status is None else status
        headers = {"x-request-id": self.id("req_")}
        if self.received.family == "anthropic":
            headers["request-id"] = self.id("req_")
        if self.behaviour.retry_after is not None:
            headers["Retry-After"] = self.behaviour.retry_after
        if self.behaviour.ratelimit_headers and self.received.family == "openai":
            headers.update(openai_ratelimit_headers(status, self.behaviour.retry_after))
        headers.update(self.quota_headers)
        if self.compress:
            # Set even when the answer goes out uncompressed: it depends on the header.
            headers["Vary"] = "Accept-Encoding"
        if self.coding is not None:
            headers["Content-Encoding"] = self.coding
        headers.update(self.behaviour.headers)
        return headers

    def encoder(self) -> Encoder | None:
        """The encoder for this answer's body (None: uncompressed); records the coding."""
        self.received.encoding = self.coding
        return encoder(self.coding) if self.coding is not None else None

    def json(self, payload: object, status: int | None = None) -> web.Response:
        status = self.behaviour.status if status is None else status
        return self.raw(status, json.dumps(payload).encode())

    def raw(self, status: int, body: bytes) -> web.Response:
        """Answers `body` as JSON, compressed whole (Content-Length is the compressed size)."""
        self.received.status = status
        if (coder := self.encoder()) is not None:
            body = coder.finish(body)
        return web.Response(
            status=status,
            reason=REASONS.get(status),
            body=body,
            content_type="application/json",
            headers=self.headers(status),
        )

    def error(
        self, status: int, message: str | None = None, invalid_key: bool = False
    ) -> web.Response:
        family, key = self.received.family, self.received.key
        return self.json(error_body(family, status, message, invalid_key, key), status)

    def missing_key(self) -> web.Response:
        if self.received.family == "gemini":
            return self.error(403, UNREGISTERED_CALLER)
        if self.received.family == "anthropic":
            return self.error(401, "x-api-key header is required")
        return self.error(401, "You didn't provide an API key.")

    def drop(self, response: web.StreamResponse) -> web.StreamResponse:
        """Closes the connection mid-answer (resets it, with `reset`); aiohttp then fails
        quietly to finish it."""
        self.received.dropped = True
        transport = self.request.transport
        if transport is None:
            return response
        if self.behaviour.reset:
            # Linger 0: close() sends RST at once, and what was not yet sent is lost.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            # close(), not abort(): the events already written still reach the client.
            transport.close()
        return response

    async def in_halves(self, whole: web.Response) -> web.StreamResponse:
        """Sends `whole`'s headers and the first half of its body, then closes the
        connection (`cut_body`) or waits `body_delay` before the rest."""
        body = bytes(whole.body) if isinstance(whole.body, bytes | bytearray) else b""
        response = web.StreamResponse(status=whole.status, reason=whole.reason,
                                      headers=whole.headers)  # fmt: skip
        response.content_length = len(body)
        half = len(body) // 2
        try:
            await response.prepare(self.request)
            await response.write(body[:half])
            if self.behaviour.cut_body:
                return self.drop(response)
            await asyncio.sleep(self.behaviour.body_delay)
            await response.write(body[half:])
            await response.write_eof()
        except ConnectionError:
            self.client_left()
        return response

    def client_left(self) -> None:
        """The client closed the connection before the body ended."""
        if self.received.terminal_sent:
            self.received.tail_cut = True
        else:
            self.on_disconnect(self.received)

    async def stream(self, frames: Iterable[Frame], content_type: str) -> web.StreamResponse:
        """Writes `frames` one at a time, spacing content events by `event_interval`.

        Compressed, each frame is flushed on its own, so that it reaches the client (and
        its decoder) when written, as it would uncompressed.
        """
        behaviour = self.behaviour
        response = web.StreamResponse(
            status=behaviour.status, headers=self.headers(behaviour.status)
        )
        response.content_type = content_type
        response.headers["Cache-Control"] = "no-cache"
        self.received.status = behaviour.status
        coder = self.encoder()
        if behaviour.malformed_sse and content_type == "text/event-stream":
            frames = itertools.chain(((event, False) for event in MALFORMED_EVENTS), frames)
        try:
            await response.prepare(self.request)
            sent = 0
            for data, is_content in frames:
                cut = behaviour.drop_after is not None and sent >= behaviour.drop_after
                if cut and (is_content or sent > 0):
                    return self.drop(response)
                if is_content:
                    if sent and behaviour.event_interval:
                        await asyncio.sleep(behaviour.event_interval)
                    sent += 1
                await response.write(coder.flush(data) if coder is not None else data)
                self.received.events_sent = sent
            # Whole once its final frame is out: what follows (the coding's end, the end of
            # the body) carries no event, and a client may rightly close before it.
            self.received.terminal_sent = self.received.finished = True
            self.on_change()
            if behaviour.tail_delay:
                await asyncio.sleep(behaviour.tail_delay)
            if coder is not None:
                await response.write(coder.finish())
            await response.write_eof()
        except ConnectionError:
            self.client_left()
        return response


def quota_headers(quota: Quota, spent: Spent, now: float) -> dict[str, str]:
    """The headers announcing what is left of `quota`, in its style."""
    reset_at = spent.began + quota.window
    left = {}
    if quota.requests is not None:
        left["requests"] = (quota.requests, max(0, quota.requests - spent.requests))
    if quota.tokens is not None:
        left["tokens"] = (quota.tokens, max(0, quota.tokens - spent.tokens))
    headers: dict[str, str] = {}
    for kind, (limit, remaining) in left.items():
        if quota.style == "openai":
            prefix, suffix = "x-ratelimit-", f"-{kind}"
            reset = duration(max(0.0, reset_at - now))
            names = (
                f"{prefix}limit{suffix}",
                f"{prefix}remaining{suffix}",
                f"{prefix}reset{suffix}",
            )
        else:
            prefix = f"anthropic-ratelimit-{kind}-"
            reset = datetime.fromtimestamp(math.ceil(reset_at), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            names = (f"{prefix}limit", f"{prefix}remaining", f"{prefix}reset")
        headers.update(zip(names, (str(limit), str(remaining), reset), strict=True))
    return headers


# -- requests --------------------------------------------------------------------------

KEY_ORDER: dict[Family, tuple[KeySource, ...]] = {
    "openai": ("authorization", "x-api-key", "x-goog-api-key", "query"),
    "anthropic": ("x-api-key", "authorization", "x-goog-api-key", "query"),
    "gemini": ("query", "x-goog-api-key", "authorization", "x-api-key"),
}
GEMINI_GENERATE = re.compile(
    r"^/(?:v1beta|v1)/models/(?P<model>[^/:]+):(?P<action>generateContent|streamGenerateContent)$"
)


def find_credentials(request: web.Request) -> dict[KeySource, str]:
    """Every credential the request carries, by where it was found."""
    found: dict[KeySource, str] = {}
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        found["authorization"] = value.strip()
    if value := request.headers.get("x-api-key", ""):
        found["x-api-key"] = value
    if value := request.headers.get("x-goog-api-key", ""):
        found["x-goog-api-key"] = value
    if value := request.query.get("key", ""):
        found["query"] = value
    return found


ROUTES: dict[tuple[str, str], tuple[Family, Answer]] = {
    ("POST", "/v1/chat/completions"): ("openai", openai_chat),
    ("POST", "/v1/responses"): ("openai", openai_responses),
    ("POST", "/v1/embeddings"): ("openai", openai_embeddings),
    ("POST", "/v1/messages"): ("anthropic", anthropic_messages),
    ("GET", "/v1beta/models"): ("gemini", gemini_models),
    ("POST", "/v1beta/openai/chat/completions"): ("gemini", openai_chat),
    ("POST", "/v1beta/openai/embeddings"): ("gemini", openai_embeddings),
    ("GET", "/v1beta/openai/models"): ("gemini", openai_models),
}


def route(
    method: str, path: str, credentials: dict[KeySource, str], headers: Mapping[str, str]
) -> tuple[Family, Answer | None]:
    """Which provider a path belongs to, and the answer for it (None: unknown path)."""
    if (method, path) in ROUTES:
        return ROUTES[(method, path)]
    if method == "POST" and (match := GEMINI_GENERATE.match(path)):
        if match["action"] == "streamGenerateContent":
            return "gemini", gemini_stream
        return "gemini", gemini_generate
    if method == "GET" and path == "/v1/models":
        # OpenAI, Anthropic and Gemini (v1) all list models here; the headers say who.
        family = family_of_request(credentials, headers)
        return family, {
            "openai": openai_models,
            "anthropic": anthropic_models,
            "gemini": gemini_models,
        }[family]
    if path.startswith("/v1beta/"):
        return "gemini", None
    if path.startswith("/v1/messages"):
        return "anthropic", None
    return family_of_request(credentials, headers), None


def family_of_request(credentials: dict[KeySource, str], headers: Mapping[str, str]) -> Family:
    # The anthropic SDK sends its key as a Bearer token, like OpenAI's, but always
    # names its API version.
    if "x-api-key" in credentials or "anthropic-version" in headers:
        return "anthropic"
    if "x-goog-api-key" in credentials or "query" in credentials:
        return "gemini"
    return "openai"


def parse_json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def is_stream(request: web.Request, payload: Any) -> bool:
    if request.path.endswith(":streamGenerateContent"):
        return True
    return isinstance(payload, dict) and payload.get("stream") is True


# -- entry points ----------------------------------------------------------------------


def running_provider() -> Iterator[FakeProvider]:
    """A started provider for a pytest fixture (`yield from running_provider()`); stops after."""
    with FakeProvider() as provider:
        yield provider


def main(argv: list[str] | None = None) -> None:
    """Serves the fake provider in the foreground until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS)
    parser.add_argument("--event-interval", type=float, default=0)
    parser.add_argument("--first-byte-delay", type=float, default=0)
    parser.add_argument("--record", action="store_true", help="keep every request (memory grows)")
    parser.add_argument(
        "--no-compress",
        dest="compress",
        action="store_false",
        help="answer uncompressed whatever Accept-Encoding says",
    )
    args = parser.parse_args(argv)
    provider = FakeProvider(args.host, args.port, record=args.record, compress=args.compress)
    provider.behave_default(
        Behaviour(
            events=args.events,
            event_interval=args.event_interval,
            first_byte_delay=args.first_byte_delay,
        )
    )
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    # Blocked before the server thread starts, so only this thread takes them (sigwait).
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    with provider:
        print(f"fake provider listening on {provider.url}", flush=True)
        signal.sigwait(stop_signals)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
