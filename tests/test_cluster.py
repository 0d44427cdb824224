"""Two web nodes on one MariaDB and one Redis, as a cluster runs: what one node learns
about a key, and what an operator changes on one, is in force on the other at once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from conftest import ADMIN_KEY, ON_MYSQL, ON_REDIS
from keys.caps import RECHECK
from tests.fakeprovider import Behaviour, FakeProvider

pytestmark = pytest.mark.skipif(
    not (ON_MYSQL and ON_REDIS), reason="a cluster needs MySQL and Redis"
)
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def call(node: Any, key: str) -> httpx.Response:
    return httpx.post(f"{node.url}/proxy/pair/v1/chat/completions", json=CHAT,
                      headers={"Authorization": f"Bearer {key}"}, timeout=10)  # fmt: skip


def within(seconds: float, check: Any) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_two_nodes_share_key_states_and_settings(serve):
    with FakeProvider() as fake:
        first = serve(env={"AUTH_KEY": ADMIN_KEY})
        second = serve(env={"AUTH_KEY": ADMIN_KEY, "IS_SLAVE": "true"})
        first.wait_ready()
        second.wait_ready()
        group = httpx.post(f"{first.url}/api/groups", headers=ADMIN, json={
            "name": "pair", "channel_type": "openai", "test_model": "m",
            "proxy_keys": "sk-pair-proxy-0123456789",
            "upstreams": [{"url": fake.url, "weight": 1}]}).json()["data"]  # fmt: skip
        added = httpx.post(f"{first.url}/api/keys/add-multiple", headers=ADMIN,
                           json={"group_id": group["id"], "keys_text": "bad good1 good2"})  # fmt: skip
        assert added.status_code == 200, added.text
        proxy_key = "sk-pair-proxy-0123456789"
        # Both nodes pick the group up within a second of its creation.
        assert within(3, lambda: call(second, proxy_key).status_code == 200)
        assert within(3, lambda: call(first, proxy_key).status_code == 200)
        fake.behave("bad", Behaviour(status=401))
        fake.clear()
        for _ in range(6):  # the first node meets the bad key, benches it, retries
            assert call(first, proxy_key).status_code == 200
            if "bad" in fake.keys_used():
                break
        assert fake.keys_used().count("bad") == 1
        time.sleep(1.0)
        fake.clear()
        for _ in range(6):
            assert call(second, proxy_key).status_code == 200
        assert "bad" not in fake.keys_used()  # the second node never tried it
        # A setting changed through one node is in force on the other within a second.
        changed = httpx.put(f"{first.url}/api/settings", headers=ADMIN,
                            json={"proxy_keys": "sk-new-global-0123456789"})  # fmt: skip
        assert changed.status_code == 200, changed.text
        began = time.monotonic()
        assert within(3, lambda: call(second, "sk-new-global-0123456789").status_code == 200)
        assert time.monotonic() - began < 1.0


def test_two_nodes_count_each_keys_caps_once(serve):
    """`key_rpm` and `key_max_concurrency` are counted in Redis: two nodes together never
    send a key more than its cap, as one node would not."""
    with FakeProvider() as fake:
        first = serve(env={"AUTH_KEY": ADMIN_KEY})
        second = serve(env={"AUTH_KEY": ADMIN_KEY, "IS_SLAVE": "true"})
        first.wait_ready()
        second.wait_ready()
        proxy_key = "sk-caps-proxy-0123456789"
        for name, config, secret in (("rpm", {"key_rpm": 3}, "solo-rpm"),
                                     ("conc", {"key_max_concurrency": 1}, "solo-conc")):  # fmt: skip
            group = httpx.post(f"{first.url}/api/groups", headers=ADMIN, json={
                "name": name, "channel_type": "openai", "test_model": "m", "config": config,
                "proxy_keys": proxy_key, "upstreams": [{"url": fake.url, "weight": 1}],
            }).json()["data"]  # fmt: skip
            added = httpx.post(f"{first.url}/api/keys/add-multiple", headers=ADMIN,
                               json={"group_id": group["id"], "keys_text": secret})  # fmt: skip
            assert added.status_code == 200, added.text

        def on(node: Any, group: str, timeout: float = 10) -> httpx.Response:
            return httpx.post(f"{node.url}/proxy/{group}/v1/chat/completions", json=CHAT,
                              headers={"Authorization": f"Bearer {proxy_key}"}, timeout=timeout)  # fmt: skip

        assert within(3, lambda: on(second, "conc").status_code == 200)  # both know the groups
        assert within(3, lambda: on(first, "conc").status_code == 200)
        statuses = [on(node, "rpm").status_code for node in (first, second) * 4]
        assert sorted(statuses) == [200] * 3 + [503] * 5
        assert fake.keys_used().count("solo-rpm") == 3
        fake.behave("solo-conc", Behaviour(first_byte_delay=1.0))
        before = len(fake.requests)
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(on, first, "conc")
            assert fake.wait_for_requests(before + 1)
            assert on(second, "conc").status_code == 503  # its one slot is taken on the first
            assert slow.result().status_code == 200
        # Given back: the second node sees it once its own hold on the full key (RECHECK
        # seconds from its refusal) is over.
        assert within(RECHECK + 2, lambda: on(second, "conc").status_code == 200)
