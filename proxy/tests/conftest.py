from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from django.conf import settings as django_settings

from conftest import free_port
from keys.caps import PREFIX as CAPS_PREFIX
from keys.caps import LocalCounts, caps
from keys.models import APIKey, Group
from keys.states import KEY_STATES
from proxy.pipeline import limiter
from proxy.recorder import recorder
from proxy.runtime import runtime
from settings_app.models import SystemSetting
from tests.fakeprovider import FakeProvider

PROXY_KEY = "sk-proxy-test-key-0123456789"


@pytest.fixture(scope="session")
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fake:
        yield fake


@pytest.fixture(scope="session")
def gateway() -> Iterator[str]:
    """gptload's ASGI application under uvicorn on a loopback port, in this process."""
    from gptload.asgi import application

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(application, host="127.0.0.1", port=port, lifespan="off", log_config=None)
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def make_group(provider, settings):
    """Creates a group on the fake provider with the given keys, and reloads the proxy."""

    def make(
        name: str = "openai",
        channel: str = "openai",
        keys: tuple[str, ...] = ("k1", "k2"),
        **fields,
    ) -> Group:
        settings.AUTH_KEY = PROXY_KEY
        SystemSetting.objects.update_or_create(  # logs written at once, for the tests to see
            setting_key="request_log_write_interval_minutes", defaults={"setting_value": "0"}
        )
        fields.setdefault("upstreams", [{"url": provider.url, "weight": 1}])
        group = Group.objects.create(
            name=name, channel_type=channel, test_model="m", proxy_keys=PROXY_KEY, **fields
        )
        for key in keys:
            APIKey.build(group, key).save()
        runtime.invalidate()
        return group

    provider.reset()
    caps.local = LocalCounts()  # counts of an earlier test's keys, whose ids come again
    if django_settings.REDIS_DSN:  # states shared by an earlier run name other keys
        import redis

        shared = redis.Redis.from_url(django_settings.REDIS_DSN)
        shared.delete(KEY_STATES, *shared.keys(CAPS_PREFIX + "*"))
    yield make
    # The test's last log rows are written before the next test starts.
    wait_until(lambda: limiter.inflight == 0 and recorder.idle)
    runtime.invalidate()


def proxy_url(gateway: str, group: str) -> str:
    return f"{gateway}/proxy/{group}"


def wait_until(check, timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


__all__ = ["PROXY_KEY", "httpx", "proxy_url", "wait_until"]
