"""The HTTP client gptload calls providers with: the proxy's and the key checker's.

httpx's API on httpx-aiohttp's transport (PERFORMANCE.md §1: httpcore's pool is several
times slower under concurrency): keep-alive, redirects not followed, bytes passed through
undecoded, and an outbound proxy when configured (http, https, socks5, socks5h), else the
standard HTTP(S)_PROXY variables when they are set.
"""

from __future__ import annotations

import base64
import os

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


def upstream_client(
    proxy_url: str,
    *,
    limit: int,
    per_host: int = 0,
    idle_timeout: float = 120,
    timeout: httpx.Timeout | None = None,
) -> httpx.AsyncClient:
    """A client with at most `limit` connections (`per_host` each host; 0: no own cap).

    The aiohttp session is made on first use, inside the event loop that runs it.
    """
    proxy = outbound_proxy(proxy_url) if proxy_url and not proxy_url.startswith("socks") else None

    def session() -> aiohttp.ClientSession:
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
            skip_auto_headers=("User-Agent",),
            trust_env=not proxy_url and any(os.environ.get(v) for v in PROXY_VARIABLES),
        )

    limits = httpx.Limits(max_connections=limit, keepalive_expiry=idle_timeout)
    transport = AiohttpTransport(client=session, limits=limits, proxy=proxy)
    return httpx.AsyncClient(
        transport=transport, follow_redirects=False, timeout=timeout or httpx.Timeout(None)
    )


def outbound_proxy(url: str) -> httpx.Proxy:
    """An http(s) proxy, its credentials as a header (aiohttp deprecates BasicAuth).

    aiohttp moves an `Authorization` among the proxy headers to `Proxy-Authorization`, on
    the request itself for plain HTTP and on the CONNECT for HTTPS, never to the origin.
    """
    parsed = httpx.URL(url)
    if not (parsed.username or parsed.password):
        return httpx.Proxy(url)
    token = base64.b64encode(f"{parsed.username}:{parsed.password}".encode()).decode()
    return httpx.Proxy(parsed.copy_with(username=None, password=None),
                       headers={"Authorization": f"Basic {token}"})  # fmt: skip
