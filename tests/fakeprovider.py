"""A fake OpenAI / Anthropic / Gemini upstream: a real aiohttp server on a loopback port.

Tests point gptload groups at `FakeProvider.url` and choose what each upstream API key
does with `provider.behave(key, Behaviour(...))`: answer normally, fail with a status in
the provider's own error shape, wait before the first byte, space stream events, or cut a
stream. Every request is recorded (`provider.requests`) with the credential it carried.

The answers, in `tests/fakeprovider_responses.py` beside this file, are complete enough
for the real SDKs (openai, anthropic, google-genai) to parse them, and token usage is
deterministic: `PROMPT_TOKENS` in, one token per content chunk out (`COMPLETION_TOKENS`
with the default `DEFAULT_EVENTS` chunks). Their public names are importable from here.

Run standalone for a benchmark: `python tests/fakeprovider.py --port 9000`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

if not __package__:
    # Run as a script (`python tests/fakeprovider.py`): the project root is not on
    # sys.path then, and the answers below are imported as `tests.…` either way.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.background import BackgroundServer
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
    "COMPLETION_TOKENS",
    "DEFAULT_EVENTS",
    "DEFAULT_MODEL",
    "EMBEDDING_DIMENSIONS",
    "GEMINI_MODELS",
    "INVALID_KEY_MESSAGE",
    "OPENAI_MODELS",
    "PROMPT_TOKENS",
    "TOTAL_TOKENS",
    "Behaviour",
    "FakeProvider",
    "Received",
    "chunk_text",
    "error_body",
    "full_text",
    "main",
    "running_provider",
]

INVALID_KEY_MESSAGE = "API key not valid. Please pass a valid API key."
DEFAULT_MODEL = "fake-model"

Family = Literal["openai", "anthropic", "gemini"]
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
    - `invalid_key_message` answers 400 "API key not valid…", as Gemini does for bad keys,
      in the provider's error shape.
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


@dataclass
class Received:
    """One request as the fake provider saw it, and how it ended.

    `headers` looks names up case-insensitively. `key` is the credential the provider
    would read, from `key_source`; `credentials` holds every credential present.
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
    status: int | None = None
    events_sent: int = 0
    finished: bool = False
    dropped: bool = False
    disconnected: bool = False


class FakeProvider(BackgroundServer):
    """The fake upstream, served from its own thread and event loop.

    Use it as a context manager, or `start()` / `stop()`. All methods are thread-safe.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        require_key: bool = True,
        record: bool = True,
    ) -> None:
        self.host = host
        self.require_key = require_key
        self.record = record
        self._port = port
        self._changed = threading.Condition()
        self._requests: list[Received] = []
        self._behaviours: dict[str, Behaviour] = {}
        self._default = Behaviour()
        self._disconnects = 0
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

    def _note(self, received: Received) -> None:
        if self.record:
            with self._changed:
                self._requests.append(received)
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
        call = Call(request, received, self.behaviour_for(key), self._note_disconnect)
        try:
            response = await self._answer(call, answer)
        except asyncio.CancelledError:
            self._note_disconnect(received)
            raise
        received.finished = not (received.dropped or received.disconnected)
        return response

    async def _answer(self, call: Call, answer: Answer | None) -> web.StreamResponse:
        behaviour = call.behaviour
        if behaviour.first_byte_delay:
            await asyncio.sleep(behaviour.first_byte_delay)
        if answer is None:
            return call.error(404, f"Invalid URL ({call.request.method} {call.request.path})")
        if call.received.key is None and self.require_key:
            return call.missing_key()
        if behaviour.invalid_key_message:
            return call.error(400, INVALID_KEY_MESSAGE, invalid_key=True)
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
    ) -> None:
        self.request = request
        self.received = received
        self.behaviour = behaviour
        self.on_disconnect = on_disconnect
        self.created = int(time.time())
        payload = received.json if isinstance(received.json, dict) else {}
        self.body: dict[str, Any] = payload
        gemini = GEMINI_GENERATE.match(request.path)
        self.model = str(gemini["model"] if gemini else payload.get("model") or DEFAULT_MODEL)

    @property
    def events(self) -> int:
        return max(self.behaviour.events, 0)

    def id(self, prefix: str) -> str:
        return f"{prefix}{self.received.index:08d}"

    def headers(self) -> dict[str, str]:
        headers = {"x-request-id": self.id("req_")}
        if self.received.family == "anthropic":
            headers["request-id"] = self.id("req_")
        if self.behaviour.retry_after is not None:
            headers["Retry-After"] = self.behaviour.retry_after
        headers.update(self.behaviour.headers)
        return headers

    def json(self, payload: object, status: int | None = None) -> web.Response:
        status = self.behaviour.status if status is None else status
        return self.raw(status, json.dumps(payload).encode())

    def raw(self, status: int, body: bytes) -> web.Response:
        self.received.status = status
        return web.Response(
            status=status,
            reason=REASONS.get(status),
            body=body,
            content_type="application/json",
            headers=self.headers(),
        )

    def error(
        self, status: int, message: str | None = None, invalid_key: bool = False
    ) -> web.Response:
        return self.json(error_body(self.received.family, status, message, invalid_key), status)

    def missing_key(self) -> web.Response:
        if self.received.family == "gemini":
            return self.error(403, UNREGISTERED_CALLER)
        if self.received.family == "anthropic":
            return self.error(401, "x-api-key header is required")
        return self.error(401, "You didn't provide an API key.")

    def drop(self, response: web.StreamResponse) -> web.StreamResponse:
        """Closes the connection mid-answer; aiohttp then fails quietly to finish it."""
        self.received.dropped = True
        if self.request.transport is not None:
            # close(), not abort(): the events already written still reach the client.
            self.request.transport.close()
        return response

    async def stream(self, frames: Iterable[Frame], content_type: str) -> web.StreamResponse:
        """Writes `frames` one at a time, spacing content events by `event_interval`."""
        behaviour = self.behaviour
        response = web.StreamResponse(status=behaviour.status, headers=self.headers())
        response.content_type = content_type
        response.headers["Cache-Control"] = "no-cache"
        self.received.status = behaviour.status
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
                await response.write(data)
                self.received.events_sent = sent
            await response.write_eof()
        except ConnectionError:
            self.on_disconnect(self.received)
        return response


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


# -- errors ----------------------------------------------------------------------------

REASONS = {529: "Overloaded"}
UNREGISTERED_CALLER = (
    "Method doesn't allow unregistered callers (callers without established identity)."
    " Please use API Key or other form of API consumer identity to call this API."
)
OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: ("invalid_request_error", "unknown_url", "Not found."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests. Please try again later.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", None, "The engine is currently overloaded, please try again later"),
}
ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: (
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}
GEMINI_ERRORS: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials."),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    404: ("NOT_FOUND", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    500: (
        "INTERNAL",
        "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
    ),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}


def error_body(
    family: Family, status: int, message: str | None = None, invalid_key: bool = False
) -> dict[str, Any]:
    """The error JSON `family`'s API answers `status` with."""
    server = status >= 500
    if family == "openai":
        kind, code, text = OPENAI_ERRORS.get(
            status, ("server_error" if server else "invalid_request_error", None, f"HTTP {status}")
        )
        if invalid_key:
            code = "invalid_api_key"
        return {"error": {"message": message or text, "type": kind, "param": None, "code": code}}
    if family == "anthropic":
        kind, text = ANTHROPIC_ERRORS.get(
            status, ("api_error" if server else "invalid_request_error", f"HTTP {status}")
        )
        return {"type": "error", "error": {"type": kind, "message": message or text}}
    state, text = GEMINI_ERRORS.get(status, ("INTERNAL" if server else "UNKNOWN", f"HTTP {status}"))
    error: dict[str, Any] = {"code": status, "message": message or text, "status": state}
    if invalid_key:
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ]
    return {"error": error}


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
    args = parser.parse_args(argv)
    provider = FakeProvider(args.host, args.port, record=args.record)
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
