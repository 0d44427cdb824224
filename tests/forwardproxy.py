"""Real outbound proxies on loopback: an HTTP forward proxy and a SOCKS5 proxy.

Tests point gptload's `proxy_url` at `ForwardProxy.http_url` or `ForwardProxy.socks_url`
and read `hits` to prove that upstream traffic went through the proxy, not around it.

- HTTP: absolute-form requests (`GET http://host/path`) are forwarded in origin-form with
  `Connection: close`, one upstream connection per request; `CONNECT host:port` opens a
  tunnel. With credentials set, `Proxy-Authorization: Basic …` is required (407 otherwise).
- SOCKS5 (RFC 1928, RFC 1929): the CONNECT command to an IPv4, IPv6 or domain-name
  address (socks5h sends names); no authentication, or username/password when set.

Only the standard library is used, so the proxy shares no code with the clients it tests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import ipaddress
import socket
import threading
from collections.abc import Awaitable, Callable
from urllib.parse import SplitResult, quote, urlsplit

from tests.background import BackgroundServer

__all__ = ["ForwardProxy"]

HOST = "127.0.0.1"
CHUNK = 64 * 1024
HEAD_END = b"\r\n\r\n"
# Hop-by-hop headers meant for the proxy; `Connection` is replaced, not forwarded.
PROXY_ONLY_HEADERS = frozenset(
    {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}
)

CONNECTION_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
PROXY_AUTH_REQUIRED = (
    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
    b'Proxy-Authenticate: Basic realm="forwardproxy"\r\n'
    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
)

SOCKS_VERSION = 5
SOCKS_NO_AUTH, SOCKS_USER_PASS, SOCKS_NO_METHOD = 0x00, 0x02, 0xFF
SOCKS_CONNECT = 0x01
SOCKS_IPV4, SOCKS_DOMAIN, SOCKS_IPV6 = 0x01, 0x03, 0x04
SOCKS_OK, SOCKS_FAILURE, SOCKS_HOST_UNREACHABLE, SOCKS_REFUSED = 0x00, 0x01, 0x04, 0x05
SOCKS_BAD_COMMAND, SOCKS_BAD_ADDRESS = 0x07, 0x08

Headers = list[tuple[str, str]]
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ForwardProxy(BackgroundServer):
    """An HTTP forward proxy (absolute-form requests and CONNECT) and a SOCKS5 proxy (no auth,
    and username/password auth when given), each on its own loopback port, in a background
    thread with its own asyncio loop.

    Use it as a context manager, or `start()` / `stop()`. `hits` is safe to read from any
    thread; each entry is recorded before the proxy connects upstream, so it is there by the
    time the client has any answer.
    """

    def __init__(self, username: str | None = None, password: str | None = None) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both a username and a password, or neither")
        self.username = username
        self.password = password
        self._lock = threading.Lock()
        self._hits: list[tuple[str, str]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: dict[str, asyncio.Server] = {}
        self._connections: set[asyncio.Task[object]] = set()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> ForwardProxy:
        """Starts both proxies; returns once their ports are bound. Raises what binding raised."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        try:
            # Bound here, before the loop runs in its thread, so that errors reach the caller.
            self._servers = loop.run_until_complete(self._bind())
        except BaseException:
            loop.close()
            raise
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="forwardproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops both proxies, cutting every connection still open."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        self._loop, self._thread, self._servers = None, None, {}

    @property
    def http_url(self) -> str:
        """`http://[user:pass@]127.0.0.1:PORT`, valid once started."""
        return f"http://{self._userinfo()}{HOST}:{self._port('http')}"

    @property
    def socks_url(self) -> str:
        """`socks5://[user:pass@]127.0.0.1:PORT`, valid once started."""
        return f"socks5://{self._userinfo()}{HOST}:{self._port('socks5')}"

    @property
    def hits(self) -> list[tuple[str, str]]:
        """A copy of the proxied connections so far, oldest first: (scheme, "host:port").

        The scheme is "http" (a forwarded request), "connect" (an HTTP tunnel) or "socks5";
        the target is as the client named it (a domain name with socks5h), IPv6 bracketed.
        """
        with self._lock:
            return list(self._hits)

    def _userinfo(self) -> str:
        if self.username is None or self.password is None:
            return ""
        return f"{quote(self.username, safe='')}:{quote(self.password, safe='')}@"

    def _port(self, name: str) -> int:
        if name not in self._servers:
            raise RuntimeError("the forward proxy is not started")
        return int(self._servers[name].sockets[0].getsockname()[1])

    def _run(self) -> None:
        if self._loop is not None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_forever()

    async def _bind(self) -> dict[str, asyncio.Server]:
        servers: dict[str, asyncio.Server] = {}
        for name, handler in (("http", self._http), ("socks5", self._socks)):
            callback = functools.partial(self._serve_connection, handler)
            servers[name] = await asyncio.start_server(callback, HOST, 0)
        return servers

    async def _close(self) -> None:
        for server in self._servers.values():
            server.close()
        await asyncio.sleep(0)  # connections accepted just now start, and so are tracked
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers.values():
            await server.wait_closed()

    async def _serve_connection(
        self, handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await handler(reader, writer)
        except (OSError, EOFError, ValueError, asyncio.LimitOverrunError):
            pass  # a client that hangs up or speaks nonsense ends only its own connection
        except asyncio.CancelledError:
            # Only stop() cancels, and this task ends here anyway. Python 3.11's stream
            # server logs a cancelled connection task as an error (fixed in 3.12).
            writer.transport.abort()
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()

    def _record(self, scheme: str, host: str, port: int) -> None:
        with self._lock:
            self._hits.append((scheme, join_host_port(host, port)))

    def _credentials_match(self, username: bytes, password: bytes) -> bool:
        if self.username is None or self.password is None:
            return True
        # Both compared, always, so that timing does not tell which one was wrong.
        user_ok = hmac.compare_digest(username, self.username.encode())
        password_ok = hmac.compare_digest(password, self.password.encode())
        return user_ok and password_ok

    # -- HTTP ------------------------------------------------------------------------

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method, target, version, headers = parse_head(await reader.readuntil(HEAD_END))
        if not self._http_authorized(headers):
            await send(writer, PROXY_AUTH_REQUIRED)
            return
        if method == "CONNECT":
            await self._http_connect(target, reader, writer)
            return
        url = urlsplit(target)
        if url.scheme != "http" or not url.hostname:
            await send(writer, BAD_REQUEST)
            return
        host, port = url.hostname, url.port or 80
        self._record("http", host, port)
        upstream = await open_upstream(host, port)
        if upstream is None:
            await send(writer, BAD_GATEWAY)
            return
        # `Connection: close` makes the upstream end the exchange after one response, so
        # a keep-alive client never sends its next request (maybe for another host) into
        # this pipe: the server closes, then so do we, and the client reconnects.
        upstream[1].write(origin_form_head(method, url, version, headers))
        await tunnel(reader, writer, *upstream)

    async def _http_connect(
        self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        authority = urlsplit(f"//{target}")
        if not authority.hostname or authority.port is None:
            await send(writer, BAD_REQUEST)
            return
        self._record("connect", authority.hostname, authority.port)
        upstream = await open_upstream(authority.hostname, authority.port)
        if upstream is None:
            await send(writer, BAD_GATEWAY)
            return
        writer.write(CONNECTION_ESTABLISHED)
        await tunnel(reader, writer, *upstream)

    def _http_authorized(self, headers: Headers) -> bool:
        if self.username is None:
            return True
        value = next((v for n, v in headers if n.lower() == "proxy-authorization"), "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except binascii.Error:
            return False
        username, _, password = decoded.partition(b":")
        return self._credentials_match(username, password)

    # -- SOCKS5 ----------------------------------------------------------------------

    async def _socks(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        version, count = await reader.readexactly(2)
        if version != SOCKS_VERSION:
            return
        offered = await reader.readexactly(count)
        method = SOCKS_NO_AUTH if self.username is None else SOCKS_USER_PASS
        if method not in offered:
            await send(writer, bytes([SOCKS_VERSION, SOCKS_NO_METHOD]))
            return
        writer.write(bytes([SOCKS_VERSION, method]))
        if method == SOCKS_USER_PASS and not await self._socks_login(reader, writer):
            return
        _, command, _, address_type = await reader.readexactly(4)
        host = await read_socks_address(reader, address_type)
        if host is None:
            await send(writer, socks_reply(SOCKS_BAD_ADDRESS))
            return
        port = int.from_bytes(await reader.readexactly(2), "big")
        if command != SOCKS_CONNECT:
            await send(writer, socks_reply(SOCKS_BAD_COMMAND))
            return
        self._record("socks5", host, port)
        try:
            upstream = await asyncio.open_connection(host, port)
        except OSError as exc:
            await send(writer, socks_reply(socks_error_code(exc)))
            return
        writer.write(socks_reply(SOCKS_OK, upstream[1].get_extra_info("sockname")))
        await tunnel(reader, writer, *upstream)

    async def _socks_login(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """RFC 1929: the username/password sub-negotiation; False when refused."""
        version, length = await reader.readexactly(2)
        username = await reader.readexactly(length)
        password = await reader.readexactly((await reader.readexactly(1))[0])
        accepted = version == 1 and self._credentials_match(username, password)
        await send(writer, b"\x01\x00" if accepted else b"\x01\x01")
        return accepted


# -- helpers ---------------------------------------------------------------------------


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_head(head: bytes) -> tuple[str, str, str, Headers]:
    """Method, target, version and headers of a request head; ValueError when malformed."""
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, version = request_line.split(" ")
    headers: Headers = []
    for line in filter(None, lines):
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"malformed header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return method, target, version, headers


def origin_form_head(method: str, url: SplitResult, version: str, headers: Headers) -> bytes:
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    kept = [(n, v) for n, v in headers if n.lower() not in PROXY_ONLY_HEADERS]
    if not any(n.lower() == "host" for n, _ in kept):
        kept.insert(0, ("Host", url.netloc.rpartition("@")[2]))
    lines = [f"{method} {target} {version}", *(f"{n}: {v}" for n, v in kept)]
    return "\r\n".join([*lines, "Connection: close", "", ""]).encode("latin-1")


async def read_socks_address(reader: asyncio.StreamReader, address_type: int) -> str | None:
    """The host of a SOCKS5 request, as text; None for an unknown address type."""
    if address_type == SOCKS_IPV4:
        return str(ipaddress.IPv4Address(await reader.readexactly(4)))
    if address_type == SOCKS_IPV6:
        return str(ipaddress.IPv6Address(await reader.readexactly(16)))
    if address_type == SOCKS_DOMAIN:
        length = (await reader.readexactly(1))[0]
        return (await reader.readexactly(length)).decode("idna")
    return None


def socks_reply(code: int, bound: tuple[str, int] | None = None) -> bytes:
    """A SOCKS5 reply; `bound` is the (host, port) the proxy connected from, when it did."""
    address = ipaddress.ip_address(bound[0] if bound else "0.0.0.0")
    address_type = SOCKS_IPV4 if address.version == 4 else SOCKS_IPV6
    port = bound[1] if bound else 0
    return bytes([SOCKS_VERSION, code, 0, address_type]) + address.packed + port.to_bytes(2, "big")


def socks_error_code(exc: OSError) -> int:
    if isinstance(exc, ConnectionRefusedError):
        return SOCKS_REFUSED
    if isinstance(exc, socket.gaierror):
        return SOCKS_HOST_UNREACHABLE
    return SOCKS_FAILURE


async def open_upstream(host: str, port: int) -> Streams | None:
    """A connection to the target; None when it cannot be reached."""
    try:
        return await asyncio.open_connection(host, port)
    except OSError:
        return None


async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()


async def tunnel(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
) -> None:
    """Copies bytes both ways until either side closes; then closes the upstream side.

    (The caller closes the client side.) Errors on either side just end the tunnel: a
    reset is how many clients hang up.
    """
    copies = [
        asyncio.create_task(pipe(client_reader, upstream_writer)),
        asyncio.create_task(pipe(upstream_reader, client_writer)),
    ]
    try:
        await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Closed before the await below, which stop() may cancel in its turn.
        upstream_writer.close()
        for copy in copies:
            copy.cancel()
        await asyncio.gather(*copies, return_exceptions=True)
