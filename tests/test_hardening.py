"""Hostile input on real sockets: bodies sent before any key, bodies too big, headers and
bodies that never finish, forged forwarding headers, upstream answers that would act on
gptload's own origin, paths that smuggle a query; and the secrets and switches that make
the defaults safe."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import uuid
from typing import Any

import httpx
import pytest

from conftest import ADMIN_KEY, ON_MYSQL, ROOT, base_env, free_port
from proxy.tests.conftest import PROXY_KEY, proxy_url
from tests.fakeprovider import Behaviour, FakeProvider

# What is checked here happens in the HTTP server and the proxy's handler, before any
# store is involved, and the same on both; `make test` runs it on the SQLite pass (the
# 6-minute budget of two passes on two cores).
pytestmark = pytest.mark.skipif(ON_MYSQL, reason="HTTP-level limits run on the SQLite pass")
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT: Any = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
PROXY = {"Authorization": f"Bearer {PROXY_KEY}"}


def serve_command(port: int) -> list[str]:
    return [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--no-worker"]  # fmt: skip


def start(serve: Any, **env: str) -> Any:
    port = free_port()
    server = serve(*serve_command(port), env={"AUTH_KEY": ADMIN_KEY, **env}, port=port)
    server.wait_ready()
    return server


def make_group(server: Any, fake: FakeProvider, **fields: Any) -> str:
    name = f"h-{uuid.uuid4().hex[:8]}"
    created = httpx.post(f"{server.url}/api/groups", headers=ADMIN, json={
        "name": name, "channel_type": "openai", "test_model": "m", "proxy_keys": PROXY_KEY,
        "upstreams": [{"url": fake.url, "weight": 1}], **fields})  # fmt: skip
    assert created.status_code == 200, created.text
    added = httpx.post(f"{server.url}/api/keys/add-multiple", headers=ADMIN,
                       json={"group_id": created.json()["data"]["id"], "keys_text": "k1"})  # fmt: skip
    assert added.status_code == 200, added.text
    return name


def raw_exchange(port: int, head: bytes, body: bytes = b"", timeout: float = 15) -> bytes:
    """Sends `head` (and `body`) on a fresh socket and reads one whole answer (until its
    `content-length` is complete or the server closes the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
            top, _, rest = received.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *(\d+)", top)
            if length and len(rest) >= int(length.group(1)):
                break
        return received


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def body_of(raw: bytes) -> Any:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def test_hostile_requests_get_bounded_clear_answers(serve):
    server = start(serve, MAX_REQUEST_BODY_MB="1", SERVER_READ_TIMEOUT="2")
    port = int(server.url.rsplit(":", 1)[1])
    with FakeProvider() as fake:
        group = make_group(server, fake)
        path = f"/proxy/{group}/v1/chat/completions"

        # 400 MB announced with no key: refused from the headers, the body never read (the
        # answer comes while most of it is still unsent), and the connection closed.
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {400 * 1024 * 1024}\r\n\r\n").encode()  # fmt: skip
        raw = raw_exchange(port, head, b"x" * 65536)
        assert status_of(raw) == 401
        assert b"connection: close" in raw.lower()
        assert body_of(raw)["error"]["type"] == "authentication_error"
        # The same for a group that does not exist: nothing tells it apart from a bad key.
        raw = raw_exchange(port, head.replace(group.encode(), b"no-such-group"), b"x" * 65536)
        assert status_of(raw) == 401

        # With the key: over MAX_REQUEST_BODY_MB, by its declared length or as it arrives.
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PROXY_KEY}\r\n"
                "Content-Type: application/json\r\n").encode()  # fmt: skip
        raw = raw_exchange(port, head + f"Content-Length: {2 * 1024 * 1024}\r\n\r\n".encode())
        assert status_of(raw) == 413
        assert "MAX_REQUEST_BODY_MB" in body_of(raw)["error"]["message"]
        chunk = b"x" * (256 * 1024)
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)) + b"0\r\n\r\n"
        raw = raw_exchange(port, head + b"Transfer-Encoding: chunked\r\n\r\n", chunked)
        assert status_of(raw) == 413
        assert fake.requests == []  # nothing refused reached the upstream

        # Headers that never finish, and an /api body that never finishes: 408, closed.
        raw = raw_exchange(port, b"POST /api/groups HTTP/1.1\r\nHost: x\r\n")
        assert status_of(raw) == 408
        raw = raw_exchange(port, b"PUT /api/settings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                           + ADMIN_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n", b'{"a"')  # fmt: skip
        assert status_of(raw) == 408

        # A path that would smuggle a query or a fragment past the upstream's router.
        for smuggled in ("/v1/chat%3Fx=1", "/v1/chat%23frag", "/v1/%2e%2e/admin"):
            refused = httpx.post(proxy_url(server.url, group) + smuggled, json=CHAT, headers=PROXY)
            assert refused.status_code == 400, smuggled
            assert refused.json()["error"]["type"] == "invalid_request_error"
        # Thousands of query parameters: an answer, never a 500.
        many = "&".join(f"p{i}=1" for i in range(1500))
        assert httpx.get(f"{server.url}/api/groups?{many}", headers=ADMIN).status_code < 500
        repeated = "&".join(["a=1"] * 1500)  # short enough for the upstream's request line
        answer = httpx.post(proxy_url(server.url, group) + f"/v1/chat/completions?{repeated}",
                            json=CHAT, headers=PROXY)  # fmt: skip
        assert answer.status_code == 200
        assert fake.requests[-1].query["a"] == "1"

        # An upstream answer that would set cookies on, or run in, gptload's own origin.
        fake.behave("k1", Behaviour(headers={"Set-Cookie": "session=stolen; Path=/",
                                             "Content-Security-Policy": "default-src *"}))  # fmt: skip
        answer = httpx.post(proxy_url(server.url, group) + "/v1/chat/completions", json=CHAT,
                            headers=PROXY)  # fmt: skip
        assert answer.status_code == 200
        assert "set-cookie" not in answer.headers
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["content-security-policy"].startswith("sandbox")
        assert answer.cookies == {}
        refused = httpx.post(proxy_url(server.url, group) + "/v1/chat/completions", json=CHAT)
        assert refused.headers["x-content-type-options"] == "nosniff"

        # The server is still well after all of it.
        assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted-proxy", "stranger"])
def test_forwarded_addresses_are_believed_only_from_trusted_proxies(serve, trusted):
    server = start(serve, FORWARDED_ALLOW_IPS="127.0.0.1" if trusted else "192.0.2.1")
    with FakeProvider() as fake:
        rules = [{"key": "X-Client", "value": "${CLIENT_IP}", "action": "set"}]
        group = make_group(server, fake, header_rules=rules)
        answer = httpx.post(proxy_url(server.url, group) + "/v1/chat/completions", json=CHAT,
                            headers={**PROXY, "X-Forwarded-For": "203.0.113.9",
                                     "X-Real-IP": "203.0.113.10"})  # fmt: skip
        assert answer.status_code == 200
        assert fake.requests[-1].headers["X-Client"] == ("203.0.113.9" if trusted else "127.0.0.1")


def test_secure_cookies_and_hsts_behind_a_tls_proxy(serve):
    server = start(serve, SECURE_COOKIES="true", HSTS_SECONDS="31536000")
    page = httpx.get(f"{server.url}/admin/login/", headers={"X-Forwarded-Proto": "https"})
    assert page.status_code == 200
    assert page.headers["strict-transport-security"] == "max-age=31536000"
    cookie = page.headers["set-cookie"]
    assert "csrftoken=" in cookie
    assert "Secure" in cookie
    plain = httpx.get(f"{server.url}/admin/login/")  # plain HTTP: no HSTS (browsers ignore it)
    assert "strict-transport-security" not in plain.headers


def test_secret_key_is_its_own_secret_kept_in_the_state_directory(tmp_path):
    """Not derived from AUTH_KEY (a weak one must not make sessions forgeable); made once,
    0600, and the same for every process of the installation."""
    script = "from django.conf import settings; print(settings.SECRET_KEY)"

    def secret_key(auth_key: str) -> str:
        env = base_env(DATABASE_DSN=f"sqlite:///{tmp_path / 'gptload.db'}", AUTH_KEY=auth_key,
                       SECRET_KEY="", DJANGO_SETTINGS_MODULE="gptload.settings")  # fmt: skip
        env.pop("REDIS_DSN", None)
        result = subprocess.run([sys.executable, "-c", f"import django; django.setup(); {script}"],
                                env=env, cwd=ROOT, capture_output=True, text=True, check=True)  # fmt: skip
        return result.stdout.strip()

    first = secret_key("sk-123456")
    kept = tmp_path / "secret_key"
    assert kept.read_text().strip() == first
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600
    assert len(first) >= 40
    assert "123456" not in first
    assert secret_key("sk-another-admin-key-0123456789") == first
