"""Upstream keys that stay under their limits, through the real SDKs: the providers'
announced limits rest a key before their 429, the per-key caps (`key_rpm`,
`key_max_concurrency`) are never exceeded and their slots never leak, and
`key_wait_seconds` lets a call wait for a key that comes back soon. On both stores: the
MariaDB + Redis pass counts in Redis (`keys.caps`), the SQLite pass in-process."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import openai
import pytest
from django.conf import settings as django_settings

from conftest import ON_REDIS
from keys.caps import PREFIX as CAPS_PREFIX
from keys.models import APIKey, Group, KeyStatus
from logs.models import RequestLog
from proxy.tests.conftest import PROXY_KEY, proxy_url, wait_until
from tests.fakeprovider import TOTAL_TOKENS, Behaviour, FakeProvider, Quota, Received

pytestmark = pytest.mark.django_db(transaction=True)
CHAT: Any = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
AUTH = {"Authorization": f"Bearer {PROXY_KEY}"}


def client(gateway: str, group: str = "openai") -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy_url(gateway, group) + "/v1", api_key=PROXY_KEY,
                         max_retries=0)  # fmt: skip


def post(gateway: str, group: str = "openai") -> httpx.Response:
    return httpx.post(proxy_url(gateway, group) + "/v1/chat/completions", json=CHAT,
                      headers=AUTH, timeout=30)  # fmt: skip


def key(group: Group, secret: str) -> APIKey:
    return APIKey.objects.with_secret(group, secret).get()


def refused_by_provider(provider: FakeProvider) -> list[Received]:
    return [r for r in provider.requests if r.status == 429]


def most_at_once(requests: list[Received]) -> int:
    """The most of `requests` the fake provider was answering at the same time."""
    edges = sorted([(r.started, 1) for r in requests] + [(r.ended or 0.0, -1) for r in requests],
                   key=lambda edge: (edge[0], edge[1]))  # fmt: skip
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def inflight_slots() -> int:
    """Concurrency slots held in Redis, all keys together (0 without Redis)."""
    if not ON_REDIS:
        return 0
    import redis

    shared = redis.Redis.from_url(django_settings.REDIS_DSN)
    return sum(int(shared.zcard(name)) for name in shared.keys(CAPS_PREFIX + "*:inflight"))


# Announced limits --------------------------------------------------------------------------


def test_a_key_announcing_no_request_left_is_skipped_before_the_providers_429(
    gateway, provider, make_group
):
    group = make_group(keys=("k1", "k2"))
    provider.limit("k1", Quota(requests=2, window=5))
    sdk = client(gateway)
    for _ in range(8):
        assert sdk.chat.completions.create(**CHAT).choices[0].message.content
    assert provider.keys_used().count("k1") == 2  # its second answer said 0 left
    assert not refused_by_provider(provider)
    assert wait_until(lambda: key(group, "k1").status == KeyStatus.COOLING)
    rested = key(group, "k1")
    assert rested.last_error.startswith("rate limit announced: 0 requests left until ")
    assert rested.consecutive_failures == 0  # not a failure
    assert rested.cooling_until is not None


@pytest.mark.parametrize(
    "quota",
    [
        Quota(requests=2, window=5, style="anthropic"),
        Quota(tokens=2 * TOTAL_TOKENS, window=5, style="anthropic"),
    ],
    ids=["requests", "tokens"],
)
def test_anthropics_announced_limits_move_calls_to_another_key(
    gateway, provider, make_group, quota
):
    make_group(name="claude", channel="anthropic", keys=("a1", "a2"))
    provider.limit("a1", quota)
    claude = anthropic.Anthropic(base_url=proxy_url(gateway, "claude"), api_key=PROXY_KEY,
                                 max_retries=0)  # fmt: skip
    for _ in range(6):
        message = claude.messages.create(model="claude-haiku-4-5", max_tokens=10,
                                         messages=[{"role": "user", "content": "hi"}])  # fmt: skip
        assert message.content
    assert provider.keys_used().count("a1") == 2
    assert not refused_by_provider(provider)


def test_a_call_waits_for_the_only_key_when_it_comes_back_within_key_wait_seconds(
    gateway, provider, make_group
):
    make_group(keys=("k1",), config={"key_wait_seconds": 5})
    provider.limit("k1", Quota(requests=1, window=2))
    sdk = client(gateway)
    sdk.chat.completions.create(**CHAT)  # announces 0 left until 2 s from now
    began = time.monotonic()
    assert sdk.chat.completions.create(**CHAT).choices[0].message.content
    assert 1.0 < time.monotonic() - began < 4
    assert provider.keys_used() == ["k1", "k1"]
    assert not refused_by_provider(provider)


def test_beyond_key_wait_seconds_the_call_fails_at_once_with_an_accurate_retry_after(
    gateway, provider, make_group
):
    make_group(keys=("k1",), config={"key_wait_seconds": 1})
    provider.limit("k1", Quota(requests=1, window=6))
    client(gateway).chat.completions.create(**CHAT)
    began = time.monotonic()
    answer = post(gateway)
    assert time.monotonic() - began < 0.5
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "no_keys_available"
    assert 5 <= int(answer.headers["Retry-After"]) <= 6
    assert len(provider.requests) == 1


# Per-key caps ------------------------------------------------------------------------------


def test_key_rpm_never_lets_more_than_n_calls_a_minute_reach_a_key(gateway, provider, make_group):
    make_group(keys=("k1", "k2"), config={"key_rpm": 3})
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(gateway), range(10)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 6 + [503] * 4
    assert {k: provider.keys_used().count(k) for k in ("k1", "k2")} == {"k1": 3, "k2": 3}
    late = post(gateway)  # the minute has not freed room yet
    assert late.status_code == 503
    assert 50 <= int(late.headers["Retry-After"]) <= 61
    assert len(provider.requests) == 6


def test_key_max_concurrency_never_sends_a_key_more_calls_at_once(gateway, provider, make_group):
    make_group(keys=("k1", "k2"), config={"key_max_concurrency": 1, "key_wait_seconds": 10})
    provider.behave_default(Behaviour(first_byte_delay=0.4))
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: post(gateway), range(6)))
    assert [a.status_code for a in answers] == [200] * 6  # each waited for a free slot
    for secret in ("k1", "k2"):
        assert most_at_once(provider.requests_for(secret)) == 1
    assert len(provider.requests) == 6
    assert wait_until(lambda: inflight_slots() == 0)


def test_a_key_whose_slots_are_full_is_skipped_and_without_a_wait_the_call_fails_fast(
    gateway, provider, make_group
):
    make_group(keys=("k1",), config={"key_max_concurrency": 2})
    provider.behave_default(Behaviour(first_byte_delay=0.6))
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: post(gateway), range(3)))
    assert sorted(a.status_code for a in answers) == [200, 200, 503]
    assert len(provider.requests) == 2
    assert post(gateway).status_code == 200  # both slots given back


def test_concurrency_slots_are_given_back_however_a_call_ends(gateway, provider, make_group):
    make_group(keys=("k1",), config={"key_max_concurrency": 1, "max_retries": 0})
    sdk = client(gateway)
    provider.behave("k1", Behaviour(status=500))
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(**CHAT)  # an upstream error
    provider.behave("k1", Behaviour(event_interval=0.2, events=20))
    with sdk.chat.completions.create(**CHAT, stream=True) as stream:
        next(iter(stream))  # the client leaves mid-stream
    assert provider.wait_for_disconnects(1)
    provider.behave("k1", Behaviour())
    assert wait_until(lambda: post(gateway).status_code == 200, timeout=3)
    assert wait_until(lambda: inflight_slots() == 0)


def test_a_client_leaving_while_it_waits_for_a_key_is_logged_499(gateway, provider, make_group):
    make_group(keys=("k1",), config={"key_max_concurrency": 1, "key_wait_seconds": 20})
    provider.behave("k1", Behaviour(first_byte_delay=1.0))
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(post, gateway)
        assert provider.wait_for_requests(1)
        with pytest.raises(httpx.ReadTimeout):  # waits for the slot, then gives up
            httpx.post(proxy_url(gateway, "openai") + "/v1/chat/completions", json=CHAT,
                       headers=AUTH, timeout=0.3)  # fmt: skip
        assert holder.result().status_code == 200
    rows = RequestLog.objects.filter(status_code=499)
    assert wait_until(lambda: rows.exists())
    assert rows.get().error_message == "client disconnected while waiting for a key"
    assert len(provider.requests) == 1  # the one that left never reached the provider
    assert post(gateway).status_code == 200
    assert wait_until(lambda: inflight_slots() == 0)


def test_a_cap_lifted_by_the_operator_frees_its_keys_at_once(gateway, provider, make_group):
    group = make_group(keys=("k1",), config={"key_rpm": 1})
    assert post(gateway).status_code == 200
    assert post(gateway).status_code == 503  # held for the rest of the minute
    group.config = {}
    group.save()  # in force before save() returns (read-your-writes)
    assert post(gateway).status_code == 200
    assert provider.keys_used() == ["k1", "k1"]
