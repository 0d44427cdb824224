"""The forward proxy, driven by the clients gptload sends upstream traffic with.

httpx and aiohttp through the HTTP proxy (plain requests and CONNECT tunnels to a TLS
target), aiohttp with aiohttp_socks through the SOCKS5 proxy (socks5 and socks5h), with
and without credentials; raw sockets for the SOCKS5 replies clients do not expose.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp_socks import ProxyConnector, ProxyError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import free_port
from tests.fakeprovider import OPENAI_MODELS, FakeProvider, running_provider
from tests.forwardproxy import ForwardProxy

LOOPBACK = "127.0.0.1"
KEY = {"Authorization": "Bearer sk-ok"}
# The password holds characters that must be percent-encoded in a proxy URL.
USERNAME, PASSWORD = "alice", "p@ss:w/rd"


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    yield from running_provider()


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    with ForwardProxy() as forward_proxy:
        yield forward_proxy


@pytest.fixture
def auth_proxy() -> Iterator[ForwardProxy]:
    with ForwardProxy(USERNAME, PASSWORD) as forward_proxy:
        yield forward_proxy


def target(fake: FakeProvider, host: str = LOOPBACK) -> str:
    return f"{host}:{fake.port}"


def models_url(fake: FakeProvider, host: str = LOOPBACK) -> str:
    return f"http://{target(fake, host)}/v1/models"


def model_ids(payload: dict[str, Any]) -> list[str]:
    return [model["id"] for model in payload["data"]]


def with_password(url: str, password: str) -> str:
    """`url` with the proxy's username and `password` (empty: no credentials at all)."""
    scheme, _, address = url.partition("://")
    userinfo = f"{USERNAME}:{password}@" if password else ""
    return f"{scheme}://{userinfo}{address.rpartition('@')[2]}"


async def aiohttp_get(
    url: str, connector: aiohttp.BaseConnector | None = None, **kwargs: Any
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url, headers=KEY, timeout=aiohttp.ClientTimeout(total=5), **kwargs) as response,
    ):
        answer = response.status, await response.json(content_type=None)
    # aiohttp's documented graceful shutdown: its transports finish closing on later loop
    # turns (after the close_notify exchange with TLS), and the test's loop must see them.
    await asyncio.sleep(0.25 if "ssl" in kwargs else 0)
    return answer


# -- a TLS target, for CONNECT ---------------------------------------------------------


@dataclass(frozen=True)
class TLSTarget:
    url: str
    context: ssl.SSLContext  # trusts the target's self-signed certificate

    @property
    def address(self) -> str:
        return self.url.removeprefix("https://").rstrip("/")


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"hello": "over tls"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forward proxy test target")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSTarget]:
    cert_path, key_path = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    server = ThreadingHTTPServer((LOOPBACK, 0), Hello)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="tls-target", daemon=True)
    thread.start()
    try:
        url = f"https://{LOOPBACK}:{server.server_port}/"
        yield TLSTarget(url, ssl.create_default_context(cafile=cert_path))
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- HTTP proxy ------------------------------------------------------------------------


def test_httpx_requests_go_through_the_http_proxy(fake: FakeProvider, proxy: ForwardProxy) -> None:
    with httpx.Client(proxy=proxy.http_url, timeout=5) as client:
        answers = [client.get(models_url(fake), headers=KEY) for _ in range(3)]

    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert model_ids(answers[0].json()) == list(OPENAI_MODELS)
    assert proxy.hits == [("http", target(fake))] * 3
    assert [request.path for request in fake.requests] == ["/v1/models"] * 3
    assert "Proxy-Connection" not in fake.requests[0].headers


async def test_aiohttp_requests_go_through_the_http_proxy(
    fake: FakeProvider, proxy: ForwardProxy
) -> None:
    status, payload = await aiohttp_get(models_url(fake), proxy=proxy.http_url)

    assert status == 200
    assert model_ids(payload) == list(OPENAI_MODELS)
    assert proxy.hits == [("http", target(fake))]


def test_httpx_https_goes_through_a_connect_tunnel(
    tls_target: TLSTarget, proxy: ForwardProxy
) -> None:
    with httpx.Client(proxy=proxy.http_url, verify=tls_target.context, timeout=5) as client:
        answer = client.get(tls_target.url)

    assert answer.json() == {"hello": "over tls"}
    assert proxy.hits == [("connect", tls_target.address)]


async def test_aiohttp_https_goes_through_a_connect_tunnel(
    tls_target: TLSTarget, proxy: ForwardProxy
) -> None:
    status, payload = await aiohttp_get(
        tls_target.url, proxy=proxy.http_url, ssl=tls_target.context
    )

    assert (status, payload) == (200, {"hello": "over tls"})
    assert proxy.hits == [("connect", tls_target.address)]


async def test_the_http_proxy_accepts_its_credentials(
    fake: FakeProvider, tls_target: TLSTarget, auth_proxy: ForwardProxy
) -> None:
    async with httpx.AsyncClient(
        proxy=auth_proxy.http_url, verify=tls_target.context, timeout=5
    ) as client:
        assert (await client.get(models_url(fake), headers=KEY)).status_code == 200
        assert (await client.get(tls_target.url)).status_code == 200
    status, _ = await aiohttp_get(models_url(fake), proxy=auth_proxy.http_url)

    assert status == 200
    assert auth_proxy.hits == [
        ("http", target(fake)),
        ("connect", tls_target.address),
        ("http", target(fake)),
    ]


@pytest.mark.parametrize("password", ["", "wrong"])
async def test_the_http_proxy_refuses_missing_or_wrong_credentials(
    fake: FakeProvider, tls_target: TLSTarget, auth_proxy: ForwardProxy, password: str
) -> None:
    proxy_url = with_password(auth_proxy.http_url, password)
    async with httpx.AsyncClient(proxy=proxy_url, verify=tls_target.context, timeout=5) as client:
        assert (await client.get(models_url(fake), headers=KEY)).status_code == 407
        with pytest.raises(httpx.ProxyError, match="407"):
            await client.get(tls_target.url)
    status, _ = await aiohttp_get(models_url(fake), proxy=proxy_url)

    assert status == 407
    assert auth_proxy.hits == []
    assert fake.requests == []


def test_the_http_proxy_answers_502_when_the_target_is_down(proxy: ForwardProxy) -> None:
    closed_port = free_port()
    with httpx.Client(proxy=proxy.http_url, timeout=5) as client:
        answer = client.get(f"http://{LOOPBACK}:{closed_port}/v1/models")

    assert answer.status_code == 502
    assert proxy.hits == [("http", f"{LOOPBACK}:{closed_port}")]


# -- SOCKS5 proxy ----------------------------------------------------------------------


async def test_aiohttp_socks_goes_through_the_socks_proxy(
    fake: FakeProvider, proxy: ForwardProxy
) -> None:
    status, payload = await aiohttp_get(models_url(fake), ProxyConnector.from_url(proxy.socks_url))

    assert status == 200
    assert model_ids(payload) == list(OPENAI_MODELS)
    assert proxy.hits == [("socks5", target(fake))]


async def test_socks5h_sends_the_host_name_for_the_proxy_to_resolve(
    fake: FakeProvider, proxy: ForwardProxy
) -> None:
    connector = ProxyConnector.from_url(proxy.socks_url, rdns=True)
    status, _ = await aiohttp_get(models_url(fake, "localhost"), connector)

    assert status == 200
    assert proxy.hits == [("socks5", target(fake, "localhost"))]


async def test_the_socks_proxy_connects_to_ipv6_targets(proxy: ForwardProxy) -> None:
    try:
        ipv6_fake = FakeProvider(host="::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with ipv6_fake:
        connector = ProxyConnector.from_url(proxy.socks_url)
        status, _ = await aiohttp_get(models_url(ipv6_fake, "[::1]"), connector)

    assert status == 200
    assert proxy.hits == [("socks5", target(ipv6_fake, "[::1]"))]


@pytest.mark.parametrize("rdns", [False, True])
async def test_the_socks_proxy_accepts_its_credentials(
    fake: FakeProvider, auth_proxy: ForwardProxy, rdns: bool
) -> None:
    connector = ProxyConnector.from_url(auth_proxy.socks_url, rdns=rdns)
    status, _ = await aiohttp_get(models_url(fake), connector)

    assert status == 200
    assert auth_proxy.hits == [("socks5", target(fake))]


@pytest.mark.parametrize("password", ["", "wrong"])
async def test_the_socks_proxy_refuses_missing_or_wrong_credentials(
    fake: FakeProvider, auth_proxy: ForwardProxy, password: str
) -> None:
    connector = ProxyConnector.from_url(with_password(auth_proxy.socks_url, password))
    with pytest.raises(ProxyError):
        await aiohttp_get(models_url(fake), connector)

    assert auth_proxy.hits == []
    assert fake.requests == []


def socks_connect(proxy: ForwardProxy, command: int, port: int) -> tuple[socket.socket, bytes]:
    """A raw SOCKS5 request to 127.0.0.1:`port`; the socket and the proxy's reply."""
    proxy_port = int(proxy.socks_url.rpartition(":")[2])
    sock = socket.create_connection((LOOPBACK, proxy_port), timeout=5)
    sock.sendall(b"\x05\x01\x00")
    sock.sendall(b"\x05" + bytes([command]) + b"\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
    with sock.makefile("rb") as stream:
        assert stream.read(2) == b"\x05\x00"
        reply = stream.read(10)
    return sock, reply


def test_the_socks_proxy_refuses_commands_other_than_connect(proxy: ForwardProxy) -> None:
    sock, reply = socks_connect(proxy, command=0x02, port=free_port())  # BIND
    sock.close()

    assert reply[:2] == b"\x05\x07"
    assert proxy.hits == []


def test_the_socks_proxy_reports_a_refused_target(proxy: ForwardProxy) -> None:
    closed_port = free_port()
    sock, reply = socks_connect(proxy, command=0x01, port=closed_port)
    sock.close()

    assert reply[:2] == b"\x05\x05"
    assert proxy.hits == [("socks5", f"{LOOPBACK}:{closed_port}")]


def test_a_socks_tunnel_carries_bytes_until_the_proxy_stops(
    fake: FakeProvider, proxy: ForwardProxy
) -> None:
    sock, reply = socks_connect(proxy, command=0x01, port=fake.port)
    with sock, sock.makefile("rb") as stream:
        assert reply[:4] == b"\x05\x00\x00\x01"
        assert reply[4:8] == socket.inet_aton(LOOPBACK)
        sock.sendall(
            b"GET /v1/models HTTP/1.1\r\nHost: fake\r\nAuthorization: Bearer sk-ok\r\n\r\n"
        )
        assert stream.readline().startswith(b"HTTP/1.1 200")

        proxy.stop()

        # Returns at the end of the stream, or raises TimeoutError if the tunnel stays open.
        stream.read()
        assert sock.recv(1) == b""


def test_urls_carry_percent_encoded_credentials(auth_proxy: ForwardProxy) -> None:
    assert auth_proxy.http_url.startswith("http://alice:p%40ss%3Aw%2Frd@127.0.0.1:")
    assert auth_proxy.socks_url.startswith("socks5://alice:p%40ss%3Aw%2Frd@127.0.0.1:")
    with pytest.raises(RuntimeError, match="not started"):
        _ = ForwardProxy().http_url
