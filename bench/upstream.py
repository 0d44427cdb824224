"""A fast fake OpenAI upstream for the benchmark: asyncio + httptools (+ uvloop when installed).

It answers from canned bytes, so that it costs far less per request than the gateway under
test and is never the bottleneck:

- `POST …/chat/completions` → a small chat completion with a `usage` object, or, when the
  body has `"stream": true`, an SSE stream of `--events` chunks (plus a usage chunk when the
  body asks `stream_options.include_usage`) and `data: [DONE]`, chunked, written at once;
- `GET …/models` → a two-model list;
- `GET /__stats` → how many requests it answered, by kind (to check that the proxy reached it);
- anything else → 404.

Requests must carry `Authorization: Bearer <prefix>…` (`--key-prefix`), so the benchmark
proves the gateway swapped the client's proxy key for an upstream key. HTTP/1.1 keep-alive
and pipelining are supported; nothing else of HTTP is.

    python bench/upstream.py --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections import Counter
from typing import Any, cast

import httptools
import orjson

MODEL = "gpt-4o-mini"
CREATED = 1_700_000_000
USAGE = {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32}


def completion_body() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! How can I help you?"},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
            "system_fingerprint": "fp_bench",
        }
    )


def sse_events(events: int, include_usage: bool) -> list[bytes]:
    """The `data: …` events of one streamed completion, `[DONE]` included."""
    out = []
    for i in range(events):
        delta: dict[str, Any] = {"content": f"tok{i} "}
        if i == 0:
            delta = {"role": "assistant", "content": ""}
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": "stop" if i == events - 1 else None,
                }
            ],
        }
        if include_usage:
            chunk["usage"] = None
        out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    if include_usage:
        usage_chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [],
            "usage": USAGE,
        }
        out.append(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def fixed_response(status: str, content_type: bytes, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\n".encode()
        + b"content-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nx-request-id: req_bench\r\n\r\n"
        + body
    )


def chunked_response(content_type: bytes, parts: list[bytes]) -> bytes:
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: "
        + content_type
        + b"\r\ntransfer-encoding: chunked\r\ncache-control: no-cache\r\nx-request-id: req_bench\r\n\r\n"
    )
    body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
    return head + body + b"0\r\n\r\n"


class Canned:
    """Every response this server can give, built once."""

    def __init__(self, events: int) -> None:
        error = b'{"error":{"message":"%s","type":"invalid_request_error","code":null}}'
        self.completion = fixed_response("200 OK", b"application/json", completion_body())
        self.stream = chunked_response(b"text/event-stream", sse_events(events, False))
        self.stream_usage = chunked_response(b"text/event-stream", sse_events(events, True))
        models = {
            "object": "list",
            "data": [
                {"id": MODEL, "object": "model", "created": CREATED, "owned_by": "bench"},
                {"id": "gpt-4o", "object": "model", "created": CREATED, "owned_by": "bench"},
            ],
        }
        self.models = fixed_response("200 OK", b"application/json", orjson.dumps(models))
        self.unauthorized = fixed_response(
            "401 Unauthorized", b"application/json", error % b"Incorrect API key provided."
        )
        self.not_found = fixed_response(
            "404 Not Found", b"application/json", error % b"Unknown path."
        )
        self.bad_json = fixed_response(
            "400 Bad Request", b"application/json", error % b"The body is not JSON."
        )


class Upstream(asyncio.Protocol):
    """One client connection; httptools calls the `on_*` methods while parsing."""

    canned: Canned
    key_prefix: bytes
    stats: Counter[str]

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.authorized = False
        self.body: list[bytes] = []
        self._header = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.authorized, self.body = b"", False, []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self.authorized = value.startswith(b"Bearer " + self.key_prefix)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        response = self.respond(self.parser.get_method(), self.url.split(b"?", 1)[0])
        if self.transport is None:
            return
        self.transport.write(response)
        if not self.parser.should_keep_alive():
            self.transport.close()

    def respond(self, method: bytes, path: bytes) -> bytes:
        if path == b"/__stats":
            return fixed_response("200 OK", b"application/json", orjson.dumps(self.stats))
        if not self.authorized:
            self.stats["unauthorized"] += 1
            return self.canned.unauthorized
        if method == b"POST" and path.endswith(b"/chat/completions"):
            return self.chat_completion()
        if method == b"GET" and path.endswith(b"/models"):
            self.stats["models"] += 1
            return self.canned.models
        self.stats["not_found"] += 1
        return self.canned.not_found

    def chat_completion(self) -> bytes:
        try:
            data = orjson.loads(b"".join(self.body))
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            self.stats["bad_request"] += 1
            return self.canned.bad_json
        if data.get("stream") is True:
            options = data.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage") is True:
                self.stats["stream_usage"] += 1
                return self.canned.stream_usage
            self.stats["stream"] += 1
            return self.canned.stream
        self.stats["completion"] += 1
        return self.canned.completion


def install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--events", type=int, default=20, help="SSE content events per stream")
    parser.add_argument(
        "--key-prefix", default="sk-bench-upstream-", help="required upstream key prefix"
    )
    args = parser.parse_args(argv)
    Upstream.canned = Canned(args.events)
    Upstream.key_prefix = args.key_prefix.encode()
    Upstream.stats = Counter()
    loop_name = install_uvloop()
    print(
        json.dumps({"listening": f"http://{args.host}:{args.port}", "loop": loop_name}), flush=True
    )
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
