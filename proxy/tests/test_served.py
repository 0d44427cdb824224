"""The proxy as `manage.py serve` runs it, in its own processes: changes in force on the
next line whichever worker answers, and CORS on `/proxy/` exactly as configured."""

from __future__ import annotations

import sys
import uuid
from typing import Any

import httpx
import pytest

from conftest import ADMIN_KEY, free_port
from proxy.tests.conftest import PROXY_KEY, proxy_url
from tests.fakeprovider import FakeProvider

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT: Any = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ORIGIN = "https://chat.example.com"


def serve_command(port: int, *extra: str) -> list[str]:
    return [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--no-worker", *extra]  # fmt: skip


def test_a_group_made_through_the_api_answers_on_the_next_line_on_any_worker(serve):
    """Two workers on one port: the API call lands on one, the proxy call on either."""
    port = free_port()
    server = serve(*serve_command(port, "--workers", "2"), env={"AUTH_KEY": ADMIN_KEY}, port=port)
    server.wait_ready()
    with FakeProvider() as fake:
        for attempt in range(8):
            name = f"ryw-{uuid.uuid4().hex[:8]}"
            created = httpx.post(f"{server.url}/api/groups", headers=ADMIN, json={
                "name": name, "channel_type": "openai", "test_model": "m",
                "proxy_keys": PROXY_KEY, "upstreams": [{"url": fake.url, "weight": 1}]})  # fmt: skip
            assert created.status_code == 200, created.text
            added = httpx.post(f"{server.url}/api/keys/add-multiple", headers=ADMIN, json={
                "group_id": created.json()["data"]["id"], "keys_text": f"k-{attempt}"})  # fmt: skip
            assert added.status_code == 200, added.text
            # A new connection each time, so that either worker may take it.
            answer = httpx.post(proxy_url(server.url, name) + "/v1/chat/completions", json=CHAT,
                                headers={"Authorization": f"Bearer {PROXY_KEY}"})  # fmt: skip
            assert answer.status_code == 200, (attempt, answer.text)
            assert fake.keys_used()[-1] == f"k-{attempt}"


def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(url, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip


@pytest.mark.parametrize("credentials", [False, True], ids=["plain", "credentials"])
def test_cors_on_the_proxy_follows_the_configuration(serve, credentials):
    port = free_port()
    env = {"AUTH_KEY": ADMIN_KEY, "ENABLE_CORS": "true", "ALLOWED_ORIGINS": ORIGIN,
           "ALLOW_CREDENTIALS": str(credentials).lower()}  # fmt: skip
    server = serve(*serve_command(port), env=env, port=port)
    server.wait_ready()
    with FakeProvider() as fake:
        name = f"cors-{uuid.uuid4().hex[:8]}"
        created = httpx.post(f"{server.url}/api/groups", headers=ADMIN, json={
            "name": name, "channel_type": "openai", "test_model": "m", "proxy_keys": PROXY_KEY,
            "upstreams": [{"url": fake.url, "weight": 1}]})  # fmt: skip
        httpx.post(f"{server.url}/api/keys/add-multiple", headers=ADMIN,
                   json={"group_id": created.json()["data"]["id"], "keys_text": "k1"})  # fmt: skip
        url = proxy_url(server.url, name) + "/v1/chat/completions"
        # A browser's preflight carries no proxy key, and must not be asked for one.
        allowed = preflight(url, ORIGIN)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in allowed.headers["access-control-allow-methods"]
        assert (allowed.headers.get("access-control-allow-credentials") == "true") is credentials
        assert fake.requests == []  # answered by gptload alone
        assert "access-control-allow-origin" not in preflight(url, "https://evil.example").headers
        answer = httpx.post(url, json=CHAT, headers={"Authorization": f"Bearer {PROXY_KEY}",
                                                     "Origin": ORIGIN})  # fmt: skip
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == ORIGIN
        assert answer.headers.get_list("date").__len__() == 1


@pytest.mark.django_db(transaction=True)
def test_without_cors_a_preflight_is_just_an_unauthenticated_call(gateway, make_group):
    make_group()
    answer = preflight(proxy_url(gateway, "openai") + "/v1/chat/completions", ORIGIN)
    assert answer.status_code == 401
    assert "access-control-allow-origin" not in answer.headers
