"""Every attempt is logged, with token usage, key counters and hourly statistics."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest
from google import genai
from google.genai import types

from keys.models import APIKey
from logs.models import HourlyStat, RequestLog
from proxy.tests.conftest import PROXY_KEY, proxy_url, wait_until
from tests.fakeprovider import COMPLETION_TOKENS, PROMPT_TOKENS, TOTAL_TOKENS, Behaviour

pytestmark = pytest.mark.django_db(transaction=True)
MESSAGES: Any = [{"role": "user", "content": "hi"}]


def openai_client(gateway: str, group: str = "openai") -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy_url(gateway, group) + "/v1", api_key=PROXY_KEY,
                         max_retries=0)  # fmt: skip


def logged(count: int, **filters) -> list[RequestLog]:
    """The log rows, oldest first, once `count` of them (matching `filters`) are written."""
    rows = RequestLog.objects.filter(**filters)
    assert wait_until(lambda: rows.count() >= count), list(rows.values())
    return list(rows.order_by("timestamp"))


def test_a_call_is_logged_with_its_usage_and_counted_for_its_key_and_hour(
    gateway, provider, make_group
):
    group = make_group(keys=("k1",))
    openai_client(gateway).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    (row,) = logged(1)
    key = APIKey.objects.get()
    assert (row.status_code, row.is_success, row.request_type) == (200, True, "final")
    assert (row.group_id, row.group_name, row.model) == (group.pk, "openai", "gpt-4o-mini")
    assert (row.key_hash, row.key_value) == (key.key_hash, key.key_value)  # stored form
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (
        PROMPT_TOKENS, COMPLETION_TOKENS, TOTAL_TOKENS,
    )  # fmt: skip
    assert row.request_path == "/proxy/openai/v1/chat/completions"
    assert row.upstream_addr == provider.url + "/v1/chat/completions"
    assert (row.source_ip, row.is_stream, row.request_body) == ("127.0.0.1", False, "")
    assert wait_until(lambda: APIKey.objects.get().request_count == 1)
    assert APIKey.objects.get().last_used_at is not None
    hour = HourlyStat.objects.get(group_id=group.pk)
    assert (hour.success_count, hour.failure_count, hour.total_tokens) == (1, 0, TOTAL_TOKENS)


def test_stream_usage_is_asked_for_on_the_clients_behalf_and_hidden_again(
    gateway, provider, make_group
):
    make_group(keys=("k1",))
    client = openai_client(gateway)
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert provider.requests[0].json["stream_options"] == {"include_usage": True}
    assert all(chunk.choices for chunk in chunks)  # the usage-only chunk was taken out
    asked = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert asked[-1].choices == []
    assert asked[-1].usage is not None
    assert asked[-1].usage.total_tokens == TOTAL_TOKENS
    rows = logged(2)
    assert [(r.is_stream, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        (True, PROMPT_TOKENS, COMPLETION_TOKENS)
    ] * 2


def test_anthropic_and_gemini_stream_usage_is_read(gateway, provider, make_group):
    make_group(name="claude", channel="anthropic", keys=("ak",))
    make_group(name="gemini", channel="gemini", keys=("gk",))
    claude = anthropic.Anthropic(base_url=proxy_url(gateway, "claude"), api_key=PROXY_KEY,
                                 max_retries=0)  # fmt: skip
    with claude.messages.stream(model="claude-haiku-4-5", max_tokens=10, messages=MESSAGES) as s:
        s.until_done()
    gemini = genai.Client(
        api_key=PROXY_KEY, http_options=types.HttpOptions(base_url=proxy_url(gateway, "gemini"))
    )
    for _ in gemini.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"):
        pass
    for name, model in (("claude", "claude-haiku-4-5"), ("gemini", "gemini-2.5-flash")):
        (row,) = logged(1, group_name=name)
        assert (row.model, row.is_stream) == (model, True)
        assert (row.prompt_tokens, row.completion_tokens) == (PROMPT_TOKENS, COMPLETION_TOKENS)


def test_retries_are_logged_apart_from_the_final_attempt(gateway, provider, make_group):
    group = make_group(keys=("bad", "good"))
    provider.behave("bad", Behaviour(status=401))
    openai_client(gateway).chat.completions.create(model="m", messages=MESSAGES)
    openai_client(gateway).chat.completions.create(model="m", messages=MESSAGES)
    rows = logged(3)
    retry = next(r for r in rows if r.request_type == "retry")
    assert (retry.status_code, retry.is_success) == (401, False)
    assert retry.error_message.startswith("Incorrect API key provided: ****.")  # masked
    assert [r.status_code for r in rows if r.request_type == "final"] == [200, 200]
    bad = APIKey.objects.with_secret(group, "bad").get()
    assert wait_until(lambda: APIKey.objects.get(pk=bad.pk).failure_count == 1)
    stats = HourlyStat.objects.get()
    assert (stats.success_count, stats.failure_count) == (2, 0)  # retries are not requests


def test_refusals_with_a_group_are_logged_as_final(gateway, provider, make_group):
    make_group(keys=("busy",), model_redirect_rules={"alias": "m"}, model_redirect_strict=True)
    provider.behave("busy", Behaviour(status=429, retry_after="30"))
    client = openai_client(gateway)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="unknown", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="alias", messages=MESSAGES)
    with pytest.raises(openai.InternalServerError) as caught:  # 503: the key is cooling
        client.chat.completions.create(model="alias", messages=MESSAGES)
    assert caught.value.status_code == 503
    rows = logged(3)
    assert [(r.status_code, r.model) for r in rows] == [(400, "unknown"), (429, "m"), (503, "m")]
    assert provider.requests[0].json["model"] == "m"


def test_request_bodies_are_logged_only_when_enabled(gateway, make_group):
    make_group(keys=("k1",), config={"enable_request_body_logging": True})
    openai_client(gateway).chat.completions.create(model="m", messages=MESSAGES)
    (row,) = logged(1)
    assert '"messages"' in row.request_body
    assert row.user_agent.startswith("OpenAI")
