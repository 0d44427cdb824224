"""Every provider format through the real SDKs, sync and async, streamed and not, against
a provider that compresses its answers (as the real ones do) and keeps a stream open a
moment after its last event (so the SDK, which stops at that event, closes first).

Each call must give the SDK the whole answer, and be logged once, as a success, with
its token usage read through the compression.
"""

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
from tests.fakeprovider import COMPLETION_TOKENS, PROMPT_TOKENS, Behaviour, full_text

pytestmark = pytest.mark.django_db(transaction=True)
MESSAGES: Any = [{"role": "user", "content": "hi"}]
TAIL = 0.3  # seconds the provider keeps a finished stream open


async def call(channel: str, base: str, mode: str, stream: bool) -> str:
    """The answer text, as the SDK for `channel` assembles it."""
    asynchronous = mode == "async"
    if channel in ("openai", "openai-response"):
        kind: Any = openai.AsyncOpenAI if asynchronous else openai.OpenAI
        client: Any = kind(base_url=base + "/v1", api_key=PROXY_KEY, max_retries=0)
        if channel == "openai":
            return await openai_chat(client, asynchronous, stream)
        return await openai_responses(client, asynchronous, stream)
    if channel == "anthropic":
        kind = anthropic.AsyncAnthropic if asynchronous else anthropic.Anthropic
        client = kind(base_url=base, api_key=PROXY_KEY, max_retries=0)
        return await claude(client, asynchronous, stream)
    gemini = genai.Client(api_key=PROXY_KEY, http_options=types.HttpOptions(base_url=base))
    return await gemini_call(gemini, asynchronous, stream)


async def maybe(value: Any, asynchronous: bool) -> Any:
    return await value if asynchronous else value


async def collect(items: Any, asynchronous: bool, text: Any) -> str:
    if asynchronous:
        return "".join([text(item) async for item in items])
    return "".join(text(item) for item in items)


async def openai_chat(client: Any, asynchronous: bool, stream: bool) -> str:
    # Asking for the usage chunk itself, the client gets the stream as the provider sent
    # it; when gptload asks for it on the client's behalf, it asks for it uncompressed, to
    # cut it out again (test_recording.py).
    extra = {"stream_options": {"include_usage": True}} if stream else {}
    answer = await maybe(client.chat.completions.create(model="m", messages=MESSAGES,
                                                        stream=stream, **extra), asynchronous)  # fmt: skip
    if not stream:
        return str(answer.choices[0].message.content)
    return await collect(answer, asynchronous,
                         lambda c: (c.choices[0].delta.content or "") if c.choices else "")  # fmt: skip


async def openai_responses(client: Any, asynchronous: bool, stream: bool) -> str:
    answer = await maybe(client.responses.create(model="gpt-4.1", input="hi", stream=stream),
                         asynchronous)  # fmt: skip
    if not stream:
        return str(answer.output_text)
    return await collect(answer, asynchronous,
                         lambda e: e.delta if e.type == "response.output_text.delta" else "")  # fmt: skip


async def claude(client: Any, asynchronous: bool, stream: bool) -> str:
    answer = await maybe(client.messages.create(model="claude-haiku-4-5", max_tokens=10,
                                                messages=MESSAGES, stream=stream), asynchronous)  # fmt: skip
    if not stream:
        return str(answer.content[0].text)
    return await collect(answer, asynchronous,
                         lambda e: e.delta.text if e.type == "content_block_delta" else "")  # fmt: skip


async def gemini_call(client: Any, asynchronous: bool, stream: bool) -> str:
    models = client.aio.models if asynchronous else client.models
    if not stream:
        answer = await maybe(models.generate_content(model="gemini-2.5-flash", contents="hi"),
                             asynchronous)  # fmt: skip
        return str(answer.text)
    chunks = await maybe(models.generate_content_stream(model="gemini-2.5-flash", contents="hi"),
                         asynchronous)  # fmt: skip
    return await collect(chunks, asynchronous, lambda c: c.text or "")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("channel", ["openai", "openai-response", "anthropic", "gemini"])
def test_each_sdk_gets_whole_answers_through_a_compressing_provider(
    gateway, provider, make_group, channel, mode, stream
):
    make_group(name="g", channel=channel, keys=("k1",))
    provider.behave("k1", Behaviour(tail_delay=TAIL))
    text = asyncio.run(call(channel, proxy_url(gateway, "g"), mode, stream))
    assert text == full_text()
    (received,) = provider.requests
    assert received.encoding not in (None, "identity"), "the provider did not compress"
    rows = RequestLog.objects.filter(group_name="g")
    assert wait_until(lambda: rows.count() == 1)
    row = rows.get()
    assert (row.status_code, row.is_success, row.error_message) == (200, True, "")
    assert (row.prompt_tokens, row.completion_tokens) == (PROMPT_TOKENS, COMPLETION_TOKENS)
    assert row.is_stream is stream
