"""Every key-state transition of DESIGN.md "Key states", seen through real requests."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest
from google import genai
from google.genai import errors, types

from conftest import free_port
from keys.models import APIKey, Group, GroupSubGroup, GroupType, KeyStatus
from proxy.runtime import runtime
from proxy.tests.conftest import PROXY_KEY, proxy_url, wait_until
from tests.fakeprovider import Behaviour, full_text

pytestmark = pytest.mark.django_db(transaction=True)
CHAT: Any = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def client(gateway: str, group: str = "openai") -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy_url(gateway, group) + "/v1", api_key=PROXY_KEY,
                         max_retries=0)  # fmt: skip


def key(group: Group, secret: str) -> APIKey:
    return APIKey.objects.with_secret(group, secret).get()


def test_a_cooling_key_comes_back_by_itself(gateway, provider, make_group):
    group = make_group(keys=("k1",))
    provider.behave("k1", Behaviour(status=429, retry_after="1"))
    with pytest.raises(openai.RateLimitError):
        client(gateway).chat.completions.create(**CHAT)
    assert wait_until(lambda: key(group, "k1").status == KeyStatus.COOLING)
    assert key(group, "k1").cooling_until is not None
    provider.reset()
    time.sleep(1.1)
    assert client(gateway).chat.completions.create(**CHAT).choices[0].message.content
    assert wait_until(lambda: key(group, "k1").status == KeyStatus.ACTIVE)


def test_server_errors_bench_a_key_at_the_threshold_and_a_success_resets_the_count(
    gateway, provider, make_group
):
    group = make_group(keys=("flaky",), config={"blacklist_threshold": 2, "max_retries": 0})
    provider.behave("flaky", Behaviour(status=502))
    with pytest.raises(openai.InternalServerError):
        client(gateway).chat.completions.create(**CHAT)
    assert wait_until(lambda: key(group, "flaky").consecutive_failures == 1)
    provider.reset()
    client(gateway).chat.completions.create(**CHAT)
    assert wait_until(lambda: key(group, "flaky").consecutive_failures == 0)
    provider.behave("flaky", Behaviour(status=502))
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client(gateway).chat.completions.create(**CHAT)
    assert wait_until(lambda: key(group, "flaky").status == KeyStatus.INVALID)
    assert "[status 502]" in key(group, "flaky").last_error
    with pytest.raises(openai.InternalServerError) as caught:
        client(gateway).chat.completions.create(**CHAT)
    assert caught.value.status_code == 503  # benched: nothing left to try


def test_a_threshold_of_zero_never_benches(gateway, provider, make_group):
    group = make_group(keys=("flaky",), config={"blacklist_threshold": 0, "max_retries": 0})
    provider.behave("flaky", Behaviour(status=500))
    for _ in range(4):
        with pytest.raises(openai.InternalServerError):
            client(gateway).chat.completions.create(**CHAT)
    assert wait_until(lambda: key(group, "flaky").consecutive_failures == 4)
    assert key(group, "flaky").status == KeyStatus.ACTIVE


def test_an_invalid_key_message_benches_a_gemini_key(gateway, provider, make_group):
    group = make_group(name="gemini", channel="gemini", keys=("bad", "good"))
    provider.behave("bad", Behaviour(invalid_key_message=True))
    gemini = genai.Client(
        api_key=PROXY_KEY, http_options=types.HttpOptions(base_url=proxy_url(gateway, "gemini"))
    )
    for _ in range(3):
        answer = gemini.models.generate_content(model="gemini-2.5-flash", contents="hi")
        assert answer.text == full_text()
    assert provider.keys_used().count("bad") == 1
    assert wait_until(lambda: key(group, "bad").status == KeyStatus.INVALID)


def test_an_unreachable_upstream_answers_502_and_counts_against_the_key(gateway, make_group):
    dead = f"http://127.0.0.1:{free_port()}"
    group = make_group(keys=("k1",), upstreams=[{"url": dead, "weight": 1}],
                       config={"max_retries": 0})  # fmt: skip
    with pytest.raises(openai.APIStatusError) as caught:
        client(gateway).chat.completions.create(**CHAT)
    assert caught.value.status_code == 502
    assert "Upstream unreachable" in caught.value.message
    assert wait_until(lambda: key(group, "k1").consecutive_failures == 1)


def test_disabled_keys_and_weight_zero_upstreams_are_never_used(gateway, provider, make_group):
    unused = f"http://127.0.0.1:{free_port()}"
    make_group(keys=("k1", "off"),
               upstreams=[{"url": provider.url, "weight": 1}, {"url": unused, "weight": 0}])  # fmt: skip
    APIKey.objects.filter(key_hash=key(Group.objects.get(), "off").key_hash).update(
        status=KeyStatus.DISABLED
    )
    runtime.invalidate()
    for _ in range(4):
        client(gateway).chat.completions.create(**CHAT)
    assert provider.keys_used() == ["k1"] * 4


def test_an_aggregate_without_usable_members_answers_503(gateway, provider, make_group):
    member = make_group(name="member", keys=("k1",))
    aggregate = Group.objects.create(
        name="agg", group_type=GroupType.AGGREGATE, channel_type="openai", proxy_keys=PROXY_KEY
    )
    GroupSubGroup.objects.create(group=aggregate, sub_group=member, weight=1)
    APIKey.objects.filter(group=member).update(status=KeyStatus.INVALID)
    runtime.invalidate()
    with pytest.raises(openai.InternalServerError) as caught:
        client(gateway, "agg").chat.completions.create(**CHAT)
    assert caught.value.status_code == 503
    assert "Retry-After" not in caught.value.response.headers  # none will come back by itself
    assert not provider.requests


def test_rotation_is_even_over_many_calls(gateway, provider, make_group):
    make_group(keys=tuple(f"k{i}" for i in range(5)))
    for _ in range(50):
        client(gateway).chat.completions.create(**CHAT)
    used = provider.keys_used()
    assert {used.count(f"k{i}") for i in range(5)} == {10}


def test_gemini_sdk_errors_are_typed(gateway, make_group):
    make_group(name="gemini", channel="gemini", keys=("k1",))
    gemini = genai.Client(
        api_key="wrong", http_options=types.HttpOptions(base_url=proxy_url(gateway, "gemini"))
    )
    with pytest.raises(errors.ClientError) as caught:
        gemini.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert caught.value.code == 401
    assert caught.value.status == "UNAUTHENTICATED"
