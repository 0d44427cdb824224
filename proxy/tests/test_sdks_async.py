"""The async SDK clients, streaming and not, and the OpenAI Responses API, through the proxy."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import openai
import pytest
from google import genai
from google.genai import types

from logs.models import RequestLog
from proxy.tests.conftest import PROXY_KEY, proxy_url, wait_until
from tests.fakeprovider import COMPLETION_TOKENS, PROMPT_TOKENS, full_text

pytestmark = pytest.mark.django_db(transaction=True)
MESSAGES: Any = [{"role": "user", "content": "hi"}]


async def test_async_openai_calls_and_streams_concurrently(gateway, provider, make_group):
    await asyncio.to_thread(make_group, keys=("k1", "k2"))
    client = openai.AsyncOpenAI(base_url=proxy_url(gateway, "openai") + "/v1", api_key=PROXY_KEY,
                                max_retries=0)  # fmt: skip

    async def plain() -> str:
        answer = await client.chat.completions.create(model="m", messages=MESSAGES)
        return answer.choices[0].message.content or ""

    async def streamed() -> str:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    results = await asyncio.gather(*(plain() for _ in range(8)), *(streamed() for _ in range(8)))
    assert results == [full_text()] * 16
    assert sorted(set(provider.keys_used())) == ["k1", "k2"]
    await client.close()


async def test_async_anthropic_and_gemini(gateway, provider, make_group):
    await asyncio.to_thread(make_group, name="claude", channel="anthropic", keys=("ak",))
    await asyncio.to_thread(make_group, name="gemini", channel="gemini", keys=("gk",))
    claude = anthropic.AsyncAnthropic(base_url=proxy_url(gateway, "claude"), api_key=PROXY_KEY,
                                      max_retries=0)  # fmt: skip
    async with claude.messages.stream(
        model="claude-haiku-4-5", max_tokens=10, messages=MESSAGES
    ) as stream:
        assert "".join([text async for text in stream.text_stream]) == full_text()
    gemini = genai.Client(
        api_key=PROXY_KEY, http_options=types.HttpOptions(base_url=proxy_url(gateway, "gemini"))
    )
    answer = await gemini.aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert answer.text == full_text()
    chunks = await gemini.aio.models.generate_content_stream(model="gemini-2.5-flash",
                                                             contents="hi")  # fmt: skip
    assert "".join([c.text or "" async for c in chunks]) == full_text()
    assert provider.keys_used() == ["ak", "gk", "gk"]


def test_openai_responses_api_with_usage(gateway, provider, make_group):
    make_group(name="resp", channel="openai-response", keys=("rk",))
    client = openai.OpenAI(base_url=proxy_url(gateway, "resp") + "/v1", api_key=PROXY_KEY,
                           max_retries=0)  # fmt: skip
    assert client.responses.create(model="gpt-4.1", input="hi").output_text == full_text()
    with client.responses.stream(model="gpt-4.1", input="hi") as stream:
        assert stream.get_final_response().output_text == full_text()
    rows = RequestLog.objects.filter(group_name="resp")
    assert wait_until(lambda: rows.count() == 2)
    assert {(r.is_stream, r.prompt_tokens, r.completion_tokens) for r in rows} == {
        (False, PROMPT_TOKENS, COMPLETION_TOKENS),
        (True, PROMPT_TOKENS, COMPLETION_TOKENS),
    }
