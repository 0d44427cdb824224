"""A bare aiohttp forwarder that does the proxy's job with no framework: the benchmark's yardstick.

bench/run.py runs it beside gptload, pinned the same way, so that gptload's figures can be
read as a share of what plain Python on the same event loop manages. Not shipped, and not a
gateway: one in-memory group, no database, no request-log rows, no usage parsing, no model
rules, no key blacklisting.

For `/proxy/<group>/<path>` it checks the client's proxy key (`Authorization: Bearer`,
constant time), takes the group's next upstream key (round-robin), forwards the request
with that key and the other headers minus hop-by-hop and credential ones, and relays the
answer: a plain one read whole and sent with its length, an SSE one chunk by chunk as it
arrives. A 429 or 5xx (or a failed connection) is retried on the next key, up to 3 attempts
in all, as nothing has been sent yet. `GET /health` answers 200.

    python bench/reference.py --port 9100 --upstream http://127.0.0.1:9000 \\
        --proxy-key sk-bench-proxy-… --keys-file keys.txt      # one upstream key a line
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

# As the gateway drops them (proxy/pipeline.py): the transport's business, set afresh per hop.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "host", "content-length"})  # fmt: skip
CREDENTIALS = frozenset({"authorization", "x-api-key", "x-goog-api-key"})
DROPPED = HOP_BY_HOP | CREDENTIALS
MAX_ATTEMPTS = 3
# The stand-in for request logging: enough rows to cost what an append costs, never a leak.
LOG_KEEP = 10_000


def retryable(status: int) -> bool:
    return status == 429 or status >= 500


def error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "reference_error", "code": None}}
    return web.json_response(body, status=status)


class Forwarder:
    def __init__(self, group: str, upstream: str, proxy_key: str, keys: list[str]) -> None:
        self.group, self.upstream = group, upstream.rstrip("/")
        self.proxy_key = proxy_key.encode()
        self.keys, self.turn = keys, 0
        self.log: list[tuple[float, int, int, int, float]] = []  # when, status, key, tries, ms
        self.session: aiohttp.ClientSession | None = None

    async def session_context(self, app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=1000, limit_per_host=0)
        # No overall timeout: a stream may last minutes; a silent upstream still fails.
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=600)
        # auto_decompress=False: bytes go through as the upstream encoded them.
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        )
        async with self.session:
            yield

    def next_key(self) -> tuple[int, str]:
        index = self.turn % len(self.keys)
        self.turn += 1
        return index, self.keys[index]

    def record(self, started: float, status: int, key: int, tries: int) -> None:
        self.log.append((time.time(), status, key, tries, (time.perf_counter() - started) * 1000))
        if len(self.log) > LOG_KEEP:
            del self.log[: LOG_KEEP // 2]

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "logged": len(self.log)})

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        if request.match_info["group"] != self.group:
            return error(404, "No such group.")
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip().encode() if auth.startswith("Bearer ") else b""
        if not hmac.compare_digest(given, self.proxy_key):
            return error(401, "Invalid proxy key.")
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED}
        url = f"{self.upstream}/{request.match_info['path']}"
        if request.query_string:
            url += "?" + request.query_string
        assert self.session is not None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            key_index, key = self.next_key()
            headers["Authorization"] = f"Bearer {key}"
            try:
                upstream = await self.session.request(
                    request.method, url, headers=headers, data=body or None
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt < MAX_ATTEMPTS:
                    continue
                self.record(started, 502, key_index, attempt)
                return error(502, f"upstream unreachable: {type(exc).__name__}")
            try:
                if retryable(upstream.status) and attempt < MAX_ATTEMPTS:
                    continue
                reply = CIMultiDict(
                    (k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP
                )
                if "text/event-stream" in upstream.headers.get("Content-Type", ""):
                    return await self.relay(request, upstream, reply, started, key_index, attempt)
                payload = await upstream.read()
                self.record(started, upstream.status, key_index, attempt)
                return web.Response(body=payload, status=upstream.status, headers=reply)
            finally:
                # Returns the connection to the pool once the body was read whole; closes it
                # otherwise (a retried or broken-off answer), so no stale bytes are reused.
                upstream.release()
        raise AssertionError("unreachable")  # the last attempt always returns

    async def relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        started: float,
        key_index: int,
        attempt: int,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, headers=headers)
        status = upstream.status
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            status = 499  # the client left
        except (aiohttp.ClientError, TimeoutError):
            status = 502  # the upstream broke off
            # The head is sent: cut the connection, or the final chunk would pass a
            # truncated stream off as complete.
            if request.transport is not None:
                request.transport.close()
        finally:
            self.record(started, status, key_index, attempt)
        return response


def build_app(forwarder: Forwarder) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.cleanup_ctx.append(forwarder.session_context)
    app.router.add_get("/health", forwarder.health)
    app.router.add_route("*", "/proxy/{group}/{path:.*}", forwarder.proxy)
    return app


def install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--group", default="bench")
    parser.add_argument("--upstream", required=True, help="base URL of the upstream")
    parser.add_argument("--proxy-key", required=True, help="the key clients must send")
    parser.add_argument("--keys-file", type=Path, required=True, help="upstream keys, one a line")
    args = parser.parse_args(argv)
    keys = [line.strip() for line in args.keys_file.read_text().splitlines() if line.strip()]
    if not keys:
        parser.error(f"no keys in {args.keys_file}")
    forwarder = Forwarder(args.group, args.upstream, args.proxy_key, keys)
    loop_name = install_uvloop()
    print(json.dumps({"listening": f"http://{args.host}:{args.port}", "loop": loop_name,
                      "keys": len(keys)}), flush=True)  # fmt: skip
    # No access log: the gateway's request log is what the in-memory list stands in for.
    web.run_app(build_app(forwarder), host=args.host, port=args.port, access_log=None,
                print=None, backlog=4096)  # fmt: skip


if __name__ == "__main__":
    main()
