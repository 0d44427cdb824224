"""The HTTP clients gptload calls providers with.

Both are aiohttp underneath (PERFORMANCE.md §1: httpcore's pool is several times slower
under concurrency), with keep-alive, redirects never followed, bytes passed through
undecoded, and an outbound proxy when configured (http, https, socks5, socks5h), else
the standard HTTP(S)_PROXY variables when they are set:

- `upstream_session()`: a bare aiohttp session, which the proxy's hot path drives
  itself (httpx's request model cost a quarter of its event loop);
- `upstream_client()`: httpx's API over the same session (httpx-aiohttp's transport),
  for the key checker and every other outbound call.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)
# aiohttp adds these unless told not to; a transparent proxy sends the client's own (and
# an Accept-Encoding the client never sent would get it bytes it cannot read).
NOT_AUTOMATIC = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


@dataclass(frozen=True)
class OutboundProxy:
    """An http(s) proxy for aiohttp's per-request `proxy=`, its credentials as a header.

    aiohttp moves them to `Proxy-Authorization`, on the request itself for plain HTTP and
    on the CONNECT for HTTPS, never to the origin (aiohttp deprecates BasicAuth).
    """

    url: str | None = None
    headers: dict[str, str] | None = None


def outbound_proxy(proxy_url: str) -> OutboundProxy:
    if not proxy_url or proxy_url.startswith("socks"):
        return OutboundProxy()
    parsed = httpx.URL(proxy_url)
    if not (parsed.username or parsed.password):
        return OutboundProxy(proxy_url)
    token = base64.b64encode(f"{parsed.username}:{parsed.password}".encode()).decode()
    return OutboundProxy(str(parsed.copy_with(username=None, password=None)),
                         {"Authorization": f"Basic {token}"})  # fmt: skip


def upstream_session(
    proxy_url: str, *, limit: int, per_host: int = 0, idle_timeout: float = 120
) -> aiohttp.ClientSession:
    """A session with at most `limit` connections (`per_host` each host; 0: no own cap).

    Make it inside the event loop that will use it. SOCKS proxies are its connector; an
    http(s) proxy is given per request (`outbound_proxy()`).
    """
    connector: aiohttp.BaseConnector
    slots = {"limit": limit, "limit_per_host": per_host, "keepalive_timeout": idle_timeout}
    if proxy_url.startswith("socks"):
        from aiohttp_socks import ProxyConnector

        remote_dns = proxy_url.startswith("socks5h")
        url = "socks5" + proxy_url.removeprefix("socks5h").removeprefix("socks5")
        connector = ProxyConnector.from_url(url, rdns=remote_dns, **slots)
    else:
        connector = aiohttp.TCPConnector(**slots)  # type: ignore[arg-type]
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=NOT_AUTOMATIC,
        trust_env=not proxy_url and any(os.environ.get(v) for v in PROXY_VARIABLES),
    )


def upstream_client(
    proxy_url: str,
    *,
    limit: int,
    per_host: int = 0,
    idle_timeout: float = 120,
    timeout: httpx.Timeout | None = None,
) -> httpx.AsyncClient:
    """httpx over `upstream_session()`; the session is made on first use, in its loop."""
    proxy = outbound_proxy(proxy_url)

    def session() -> aiohttp.ClientSession:
        return upstream_session(
            proxy_url, limit=limit, per_host=per_host, idle_timeout=idle_timeout
        )

    limits = httpx.Limits(max_connections=limit, keepalive_expiry=idle_timeout)
    transport_proxy = httpx.Proxy(proxy.url, headers=proxy.headers) if proxy.url else None
    transport = AiohttpTransport(client=session, limits=limits, proxy=transport_proxy)
    return httpx.AsyncClient(
        transport=transport, follow_redirects=False, timeout=timeout or httpx.Timeout(None)
    )
