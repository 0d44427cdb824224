"""Access keys on `/proxy/` through the real SDKs: where proxy keys open a group, with
their own refusals (401 expired or unknown, 403 a group or model out of scope, 429 a
limit reached with `Retry-After`) and every log row naming the key."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import anthropic
import httpx
import openai
import pytest
from django.utils import timezone
from google import genai
from google.genai import types

from access.models import AccessKey
from conftest import ADMIN_KEY, ON_REDIS
from logs.models import RequestLog
from proxy.tests.conftest import proxy_url, wait_until
from tests.fakeprovider import TOTAL_TOKENS, Behaviour, FakeProvider, full_text

pytestmark = pytest.mark.django_db(transaction=True)
MESSAGES: Any = [{"role": "user", "content": "hi"}]


def access_key(
    name: str = "team-a", groups: tuple[Any, ...] = (), **fields: Any
) -> tuple[AccessKey, str]:
    key = AccessKey(name=name, **fields)
    secret = key.issue()
    key.save()
    key.groups.set(groups)
    return key, secret


def openai_client(gateway: str, secret: str, group: str = "openai") -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy_url(gateway, group) + "/v1", api_key=secret, max_retries=0)


def chat(client: openai.OpenAI, model: str = "m") -> str:
    answer = client.chat.completions.create(model=model, messages=MESSAGES)
    return answer.choices[0].message.content or ""


def test_an_rpm_of_5_lets_5_of_8_quick_calls_through_and_says_when_to_retry(gateway, make_group):
    make_group()
    key, secret = access_key(rpm=5)
    client = openai_client(gateway, secret)
    passed, refused = 0, []
    for _ in range(8):
        try:
            assert chat(client) == full_text()
            passed += 1
        except openai.RateLimitError as refusal:
            refused.append(refusal)
    assert passed == 5
    assert len(refused) == 3
    for each in refused:
        assert 1 <= int(each.response.headers["retry-after"]) <= 60
        assert "requests per minute" in each.message
    assert wait_until(lambda: RequestLog.objects.filter(access_key_id=key.pk).count() == 8)
    assert sorted(RequestLog.objects.values_list("status_code", flat=True)) == [200] * 5 + [429] * 3


def test_expiry_disabling_groups_and_models_each_refuse_with_their_status(gateway, make_group):
    allowed = make_group()
    make_group(name="other")
    _, expired = access_key("old", expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(openai.AuthenticationError, match="expired"):
        chat(openai_client(gateway, expired))
    _, disabled = access_key("off", enabled=False)
    with pytest.raises(openai.AuthenticationError):
        chat(openai_client(gateway, disabled))
    scoped, secret = access_key("scoped", groups=(allowed,), models=["gpt-4o*"])
    with pytest.raises(openai.PermissionDeniedError, match="group 'other'"):
        chat(openai_client(gateway, secret, "other"), "gpt-4o-mini")
    with pytest.raises(openai.PermissionDeniedError, match="model 'claude-haiku'"):
        chat(openai_client(gateway, secret), "claude-haiku")
    assert chat(openai_client(gateway, secret), "gpt-4o-mini") == full_text()
    with pytest.raises(openai.AuthenticationError):  # a made-up key of the same shape
        chat(openai_client(gateway, "gl-" + "x" * 43))
    # An operator's change is in force at once: the key opens the other group too.
    scoped.groups.set([])
    assert chat(openai_client(gateway, secret, "other"), "gpt-4o-mini") == full_text()
    scoped.enabled = False
    scoped.save()
    with pytest.raises(openai.AuthenticationError):
        chat(openai_client(gateway, secret), "gpt-4o-mini")


async def test_a_tpm_limit_holds_under_20_concurrent_streams(gateway, provider, make_group):
    await asyncio.to_thread(make_group)
    provider.behave("k1", Behaviour(event_interval=0.05))
    provider.behave("k2", Behaviour(event_interval=0.05))
    tpm = 5 * TOTAL_TOKENS + 40
    key, secret = await asyncio.to_thread(access_key, tpm=tpm)
    client = openai.AsyncOpenAI(base_url=proxy_url(gateway, "openai") + "/v1", api_key=secret,
                                max_retries=0)  # fmt: skip

    async def stream() -> str:
        try:
            chunks = await client.chat.completions.create(
                model="m", messages=MESSAGES, stream=True, max_tokens=TOTAL_TOKENS
            )
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        except openai.RateLimitError:
            return "refused"

    results = await asyncio.gather(*(stream() for _ in range(20)))
    await client.close()
    answered = [r for r in results if r != "refused"]
    assert answered == [full_text()] * len(answered)
    assert 1 <= len(answered) <= 10
    assert results.count("refused") >= 10

    def used() -> int:
        rows = RequestLog.objects.filter(access_key_id=key.pk, status_code=200)
        return sum(n or 0 for n in rows.values_list("total_tokens", flat=True))

    assert await asyncio.to_thread(wait_until, lambda: used() == len(answered) * TOTAL_TOKENS)
    assert await asyncio.to_thread(used) <= tpm  # reserved before, so never overshot


def test_every_sdk_presents_an_access_key_where_it_presents_a_proxy_key(
    gateway, provider, make_group
):
    make_group(name="claude", channel="anthropic", keys=("ak",))
    make_group(name="gemini", channel="gemini", keys=("gk",))
    key, secret = access_key()
    claude = anthropic.Anthropic(
        base_url=proxy_url(gateway, "claude"), api_key=secret, max_retries=0
    )
    answer = claude.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MESSAGES)
    assert answer.content[0].text == full_text()  # type: ignore[union-attr]
    gemini = genai.Client(api_key=secret,
                          http_options=types.HttpOptions(base_url=proxy_url(gateway, "gemini")))  # fmt: skip
    assert (
        gemini.models.generate_content(model="gemini-2.5-flash", contents="hi").text == full_text()
    )
    by_query = httpx.post(proxy_url(gateway, "gemini") + "/v1beta/models/g:generateContent",
                          params={"key": secret}, json={"contents": [{"parts": [{"text": "hi"}]}]})  # fmt: skip
    assert by_query.status_code == 200
    assert provider.keys_used() == ["ak", "gk", "gk"]  # the upstream keys, never the client's
    assert wait_until(lambda: RequestLog.objects.filter(access_key_id=key.pk).count() == 3)


def test_usage_per_key_matches_its_log_rows(gateway, make_group, admin_api, settings):
    make_group()
    settings.AUTH_KEY = ADMIN_KEY  # make_group() made it the proxy key
    key, secret = access_key(daily_tokens=10_000)
    client = openai_client(gateway, secret)
    for _ in range(3):
        chat(client)
    assert wait_until(lambda: RequestLog.objects.filter(access_key_id=key.pk).count() == 3)
    usage = admin_api.data(admin_api.get(f"/access-keys/{key.pk}/usage"))
    today = usage["today"]
    rows = RequestLog.objects.filter(access_key_id=key.pk)
    assert today["requests"] == 3
    logged = sum(n or 0 for n in rows.values_list("total_tokens", flat=True))
    assert today["total_tokens"] == logged == 3 * TOTAL_TOKENS


@pytest.mark.skipif(not ON_REDIS, reason="two nodes share their counts through Redis")
def test_two_nodes_count_an_rpm_once(serve):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with FakeProvider() as fake:
        first = serve(env={"AUTH_KEY": ADMIN_KEY})
        second = serve(env={"AUTH_KEY": ADMIN_KEY, "IS_SLAVE": "true"})
        first.wait_ready()
        second.wait_ready()
        group = httpx.post(f"{first.url}/api/groups", headers=admin, json={
            "name": "shared", "channel_type": "openai", "test_model": "m",
            "upstreams": [{"url": fake.url, "weight": 1}]}).json()["data"]  # fmt: skip
        httpx.post(f"{first.url}/api/keys/add-multiple", headers=admin,
                   json={"group_id": group["id"], "keys_text": "up1 up2"}).raise_for_status()  # fmt: skip
        created = httpx.post(f"{first.url}/api/access-keys", headers=admin,
                             json={"name": "both", "rpm": 5}).json()["data"]  # fmt: skip
        secret = created["key"]

        def call(node: Any) -> int:
            return httpx.post(f"{node.url}/proxy/shared/v1/chat/completions",
                              json={"model": "m", "messages": MESSAGES},
                              headers={"Authorization": f"Bearer {secret}"}, timeout=10).status_code  # fmt: skip

        deadline = time.monotonic() + 5  # both nodes see the key within a second or so
        while call(second) == 401 and time.monotonic() < deadline:
            time.sleep(0.1)
        statuses = [call(first if n % 2 else second) for n in range(7)]
        assert sorted(statuses) == [200] * 4 + [429] * 3  # with the one that found the key
