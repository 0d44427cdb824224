"""The proxy through real sockets: the SDKs → gptload (uvicorn) → the fake provider."""

from __future__ import annotations

import itertools
import time

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import types

from keys.models import APIKey, KeyStatus
from proxy.tests.conftest import PROXY_KEY, proxy_url, wait_until
from settings_app.models import SystemSetting
from tests.fakeprovider import PROMPT_TOKENS, Behaviour, full_text

pytestmark = pytest.mark.django_db(transaction=True)


def openai_client(gateway: str, group: str = "openai", key: str = PROXY_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy_url(gateway, group) + "/v1", api_key=key, max_retries=0)


def ask(client: openai.OpenAI, **extra):
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], **extra
    )


def test_openai_sdk_calls_rotate_over_the_keys(gateway, provider, make_group):
    make_group(keys=("k1", "k2", "k3"))
    client = openai_client(gateway)
    for _ in range(6):
        answer = ask(client)
        assert answer.choices[0].message.content == full_text()
        assert answer.usage.prompt_tokens == PROMPT_TOKENS
    assert sorted(provider.keys_used()) == ["k1", "k1", "k2", "k2", "k3", "k3"]


def test_the_clients_proxy_key_never_reaches_the_upstream(gateway, provider, make_group):
    make_group()
    ask(openai_client(gateway))
    httpx.get(
        proxy_url(gateway, "openai") + f"/v1/models?key={PROXY_KEY}&limit=2",
        headers={"x-goog-api-key": PROXY_KEY},
    )
    for received in provider.requests:
        assert (
            PROXY_KEY
            not in str(dict(received.headers)) + str(received.query) + received.body.decode()
        )
        assert received.key in ("k1", "k2")
    assert provider.requests[-1].query == {"limit": "2"}


def test_streams_arrive_event_by_event(gateway, provider, make_group):
    make_group(keys=("slow",))
    provider.behave("slow", Behaviour(event_interval=0.05, events=5))
    began, arrivals = time.monotonic(), []
    for chunk in ask(openai_client(gateway), stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - began)
    assert len(arrivals) == 5
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Not buffered and released together: the events span the provider's pacing, and a busy
    # machine may bunch at most one pair of them.
    assert arrivals[-1] - arrivals[0] > 0.15, gaps
    assert sum(gap > 0.025 for gap in gaps) >= 3, gaps


def test_a_rejected_key_is_benched_and_the_call_retried_on_another(gateway, provider, make_group):
    group = make_group(keys=("bad", "good"))
    provider.behave("bad", Behaviour(status=401))
    for _ in range(3):
        assert ask(openai_client(gateway)).choices[0].message.content == full_text()
    assert provider.keys_used().count("bad") == 1
    bad = APIKey.objects.with_secret(group, "bad")
    assert wait_until(lambda: bad.get().status == KeyStatus.INVALID)


def test_a_rate_limited_key_cools_down_and_an_empty_pool_answers_503_with_retry_after(
    gateway, provider, make_group
):
    make_group(keys=("busy",))
    provider.behave("busy", Behaviour(status=429, retry_after="30"))
    with pytest.raises(openai.RateLimitError):
        ask(openai_client(gateway))
    response = httpx.post(
        proxy_url(gateway, "openai") + "/v1/chat/completions",
        json={"model": "m", "messages": []},
        headers={"Authorization": f"Bearer {PROXY_KEY}"},
    )
    assert response.status_code == 503
    assert 25 <= int(response.headers["Retry-After"]) <= 30
    assert response.json()["error"]["code"] == "no_keys_available"
    assert len(provider.requests) == 1  # the cooling key was not tried again
    assert wait_until(lambda: APIKey.objects.get().status == KeyStatus.COOLING)


def test_server_errors_are_retried_and_the_last_one_reaches_the_client_verbatim(
    gateway, provider, make_group
):
    make_group(keys=("e1", "e2"), config={"max_retries": 1})
    provider.behave_default(Behaviour(status=503))
    with pytest.raises(openai.InternalServerError) as caught:
        ask(openai_client(gateway))
    assert caught.value.status_code == 503
    assert sorted(provider.keys_used()) == ["e1", "e2"]


def test_client_mistakes_pass_through_without_retry(gateway, provider, make_group):
    make_group(keys=("k1", "k2"))
    provider.behave_default(Behaviour(status=400))
    with pytest.raises(openai.BadRequestError):
        ask(openai_client(gateway))
    assert len(provider.requests) == 1


GLOBAL_KEY = "sk-global-proxy-key-0123456789"


@pytest.mark.parametrize(
    ("group", "key", "status", "error"),
    [
        ("nope", GLOBAL_KEY, 404, openai.NotFoundError),
        # Without a global key, whether a group exists is nobody's business.
        ("nope", PROXY_KEY, 401, openai.AuthenticationError),
        ("nope", "sk-wrong", 401, openai.AuthenticationError),
        ("openai", "sk-wrong", 401, openai.AuthenticationError),
    ],
)
def test_gptloads_own_refusals_are_openai_shaped(gateway, make_group, group, key, status, error):
    make_group()
    SystemSetting.objects.update_or_create(setting_key="proxy_keys",
                                           defaults={"setting_value": GLOBAL_KEY})  # fmt: skip
    with pytest.raises(error) as caught:
        ask(openai_client(gateway, group, key))
    assert caught.value.status_code == status
    assert caught.value.body["message"]


def test_a_disabled_group_is_forbidden(gateway, make_group):
    make_group(enabled=False)
    with pytest.raises(openai.PermissionDeniedError):
        ask(openai_client(gateway))


def test_anthropic_sdk_through_the_proxy(gateway, provider, make_group):
    make_group(name="claude", channel="anthropic", keys=("ak",))
    client = anthropic.Anthropic(
        base_url=proxy_url(gateway, "claude"), api_key=PROXY_KEY, max_retries=0
    )
    message = client.messages.create(
        model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    block = message.content[0]
    assert isinstance(block, anthropic.types.TextBlock)
    assert block.text == full_text()
    with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        assert "".join(stream.text_stream) == full_text()
    assert provider.keys_used() == ["ak", "ak"]
    assert provider.requests[0].key_source == "x-api-key"
    assert provider.requests[0].headers["anthropic-version"]


def test_gemini_sdk_through_the_proxy(gateway, provider, make_group):
    make_group(name="gemini", channel="gemini", keys=("gk",))
    client = genai.Client(
        api_key=PROXY_KEY, http_options=types.HttpOptions(base_url=proxy_url(gateway, "gemini"))
    )
    assert (
        client.models.generate_content(model="gemini-2.5-flash", contents="hi").text == full_text()
    )
    streamed = "".join(
        c.text or ""
        for c in client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi")
    )
    assert streamed == full_text()
    assert provider.keys_used() == ["gk", "gk"]
    assert {r.key_source for r in provider.requests} == {"query"}


def test_every_response_reports_gptloads_overhead(gateway, make_group):
    make_group()
    response = httpx.get(
        proxy_url(gateway, "openai") + "/v1/models",
        headers={"Authorization": f"Bearer {PROXY_KEY}"},
    )
    assert response.status_code == 200
    assert float(response.headers["X-Gptload-Overhead-Ms"]) >= 0
