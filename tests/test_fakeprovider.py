"""The fake provider, driven directly by the real SDKs and httpx (no proxy in between)."""

from __future__ import annotations

import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

import aiohttp
import anthropic
import brotli
import httpx
import openai
import pytest
from backports import zstd
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from conftest import ROOT, SQLITE_PASS, free_port
from tests.fakeprovider import (
    ANTHROPIC_MODELS,
    CODINGS,
    COMPLETION_TOKENS,
    GEMINI_MODELS,
    INVALID_KEY_MESSAGE,
    MALFORMED_EVENTS,
    OPENAI_MODELS,
    PROMPT_TOKENS,
    TOTAL_TOKENS,
    Behaviour,
    Coding,
    FakeProvider,
    Quota,
    Received,
    choose_coding,
    chunk_text,
    error_body,
    full_text,
    openai_ratelimit_headers,
    running_provider,
)
from tests.fakeprovider_errors import duration

pytestmark = SQLITE_PASS


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    yield from running_provider()


def openai_client(provider: FakeProvider, key: str = "sk-ok", path: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=provider.url + path, max_retries=0, timeout=5)


def anthropic_client(provider: FakeProvider, key: str = "sk-ant-ok") -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key, base_url=provider.url, max_retries=0, timeout=5)


def gemini_client(provider: FakeProvider, key: str = "AIza-ok") -> genai.Client:
    options = genai_types.HttpOptions(base_url=provider.url, api_version="v1beta")
    return genai.Client(api_key=key, http_options=options)


def sse_data(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


CHAT = "/v1/chat/completions"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post_chat(provider: FakeProvider, key: str = "k", **kwargs: Any) -> httpx.Response:
    """A chat completion POSTed by httpx with `key` as a Bearer token; `kwargs` go to httpx."""
    return httpx.post(provider.url + CHAT, headers=bearer(key), **kwargs)


def stream_post(
    provider: FakeProvider,
    path: str = CHAT,
    headers: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
) -> AbstractContextManager[httpx.Response]:
    """A POST read as it arrives: `{"stream": true}` with Bearer "k" unless told otherwise."""
    return httpx.stream(
        "POST", provider.url + path, json=body or {"stream": True}, headers=headers or bearer("k")
    )


def only_request(provider: FakeProvider, key: str, source: str) -> Received:
    """The one request received, once checked that it carried `key` in `source`."""
    (received,) = provider.requests
    assert (received.key, received.key_source) == (key, source)
    return received


# -- OpenAI ----------------------------------------------------------------------------


def test_openai_chat_answers_with_deterministic_usage(provider):
    completion = openai_client(provider).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == full_text()
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gpt-4o-mini"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == PROMPT_TOKENS
    assert completion.usage.completion_tokens == COMPLETION_TOKENS
    assert completion.usage.total_tokens == TOTAL_TOKENS
    (received,) = provider.requests
    assert received.json["messages"] == [{"role": "user", "content": "hi"}]
    assert received.key == "sk-ok"
    assert received.finished


def test_openai_chat_stream_ends_with_a_usage_chunk_when_asked(provider):
    stream = openai_client(provider).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts == [chunk_text(i) for i in range(COMPLETION_TOKENS)]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == TOTAL_TOKENS


def test_openai_chat_stream_has_no_usage_chunk_unless_asked(provider):
    provider.behave("sk-3", Behaviour(events=3))
    with stream_post(
        provider, headers=bearer("sk-3"), body={"model": "m", "stream": True}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = sse_data(list(response.iter_lines()))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len(chunks) == 3 + 1
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_openai_async_chat_stream(provider):
    client = openai.AsyncOpenAI(api_key="sk-ok", base_url=provider.url + "/v1", max_retries=0)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == full_text()
    await client.close()


def test_openai_responses_stream_carries_usage_on_completion(provider):
    client = openai_client(provider)
    with client.responses.stream(model="gpt-4.1", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == [chunk_text(i) for i in range(COMPLETION_TOKENS)]
    assert final.output_text == full_text()
    assert final.usage is not None
    assert final.usage.input_tokens == PROMPT_TOKENS
    assert final.usage.output_tokens == COMPLETION_TOKENS
    assert final.usage.total_tokens == TOTAL_TOKENS


def test_openai_responses_create(provider):
    response = openai_client(provider).responses.create(model="gpt-4.1", input="hi")
    assert response.output_text == full_text()
    assert response.usage is not None
    assert response.usage.total_tokens == TOTAL_TOKENS


def test_openai_embeddings_and_models(provider):
    client = openai_client(provider)
    embeddings = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [len(e.embedding) for e in embeddings.data] == [8, 8]
    assert embeddings.data[0].embedding[0] == pytest.approx(0.125)
    assert [m.id for m in client.models.list()] == list(OPENAI_MODELS)


def test_openai_errors_come_in_openai_shape(provider):
    provider.behave("sk-bad", Behaviour(status=401))
    with pytest.raises(openai.AuthenticationError) as caught:
        openai_client(provider, "sk-bad").chat.completions.create(model="m", messages=[])
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert caught.value.type == "invalid_request_error"


def test_gemini_openai_compatible_chat(provider):
    client = openai_client(provider, "AIza-compat", path="/v1beta/openai")
    completion = client.chat.completions.create(model="gemini-2.5-flash", messages=[])
    assert completion.choices[0].message.content == full_text()
    received = only_request(provider, "AIza-compat", "authorization")
    assert received.path == "/v1beta/openai/chat/completions"


# -- Anthropic -------------------------------------------------------------------------


def test_anthropic_messages_create(provider):
    message = anthropic_client(provider).messages.create(
        model="claude-test", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == full_text()
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == PROMPT_TOKENS
    assert message.usage.output_tokens == COMPLETION_TOKENS
    # anthropic 2.x sends its api_key as a Bearer token, not in x-api-key.
    received = only_request(provider, "sk-ant-ok", "authorization")
    assert received.headers["anthropic-version"]


def test_anthropic_messages_stream(provider):
    client = anthropic_client(provider)
    with client.messages.stream(
        model="claude-test", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert texts == [chunk_text(i) for i in range(COMPLETION_TOKENS)]
    assert final.usage.input_tokens == PROMPT_TOKENS
    assert final.usage.output_tokens == COMPLETION_TOKENS
    assert final.stop_reason == "end_turn"


def test_anthropic_models_and_errors(provider):
    client = anthropic_client(provider)
    assert [m.id for m in client.models.list()] == list(ANTHROPIC_MODELS)
    provider.behave("sk-ant-busy", Behaviour(status=529))
    with pytest.raises(anthropic.APIStatusError) as caught:
        anthropic_client(provider, "sk-ant-busy").messages.create(
            model="m", max_tokens=1, messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 529
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }


# -- Gemini ----------------------------------------------------------------------------


def test_gemini_generate_content(provider):
    # A genai.Client closes its connections when garbage-collected: keep it referenced.
    client = gemini_client(provider)
    response = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert response.text == full_text()
    assert response.usage_metadata is not None
    assert response.usage_metadata.prompt_token_count == PROMPT_TOKENS
    assert response.usage_metadata.candidates_token_count == COMPLETION_TOKENS
    assert response.usage_metadata.total_token_count == TOTAL_TOKENS
    received = only_request(provider, "AIza-ok", "x-goog-api-key")
    assert received.path == "/v1beta/models/gemini-2.5-flash:generateContent"


def test_gemini_generate_content_stream(provider):
    client = gemini_client(provider)
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"))
    assert [c.text for c in chunks] == [chunk_text(i) for i in range(COMPLETION_TOKENS)]
    usage = chunks[-1].usage_metadata
    assert usage is not None
    assert usage.total_token_count == TOTAL_TOKENS
    assert provider.requests[0].query == {"alt": "sse"}


def test_gemini_stream_without_alt_sse_is_a_json_array(provider):
    response = httpx.post(
        provider.url + "/v1beta/models/gemini-2.5-pro:streamGenerateContent?key=AIza-q",
        json={"contents": []},
    )
    chunks = response.json()
    assert len(chunks) == COMPLETION_TOKENS
    assert chunks[-1]["usageMetadata"]["totalTokenCount"] == TOTAL_TOKENS
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert {c["modelVersion"] for c in chunks} == {"gemini-2.5-pro"}
    assert provider.requests[0].key_source == "query"


def test_gemini_models_and_invalid_key(provider):
    client = gemini_client(provider)
    assert [m.name for m in client.models.list()] == [f"models/{m}" for m in GEMINI_MODELS]
    provider.behave("AIza-bad", Behaviour(invalid_key_message=True))
    bad_client = gemini_client(provider, "AIza-bad")
    with pytest.raises(genai_errors.ClientError) as caught:
        bad_client.models.generate_content(model="g", contents="hi")
    assert caught.value.code == 400
    assert caught.value.status == "INVALID_ARGUMENT"
    assert caught.value.message == INVALID_KEY_MESSAGE


# -- behaviours, with httpx ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers", "expected"),
    [
        (
            CHAT,
            bearer("k"),
            {
                "error": {
                    "message": "Rate limit reached for requests. Please try again later.",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            },
        ),
        (
            "/v1/messages",
            {"x-api-key": "k"},
            {
                "type": "error",
                "error": {
                    "type": "rate_limit_error",
                    "message": "Number of requests has exceeded your rate limit.",
                },
            },
        ),
        (
            "/v1beta/models/g:generateContent",
            {"x-goog-api-key": "k"},
            {
                "error": {
                    "code": 429,
                    "message": "Resource has been exhausted (e.g. check quota).",
                    "status": "RESOURCE_EXHAUSTED",
                }
            },
        ),
    ],
)
def test_429_with_retry_after_in_each_providers_shape(provider, path, headers, expected):
    extra = {"x-ratelimit-reset-requests": "1s"}
    provider.behave("k", Behaviour(status=429, retry_after="2", headers=extra))
    response = httpx.post(provider.url + path, json={}, headers=headers)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.headers["x-ratelimit-reset-requests"] == "1s"
    assert response.json() == expected


def test_401_and_raw_body_override(provider):
    provider.behave("k401", Behaviour(status=401))
    response = httpx.post(provider.url + "/v1/messages", json={}, headers={"x-api-key": "k401"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    provider.behave("kraw", Behaviour(status=503, body=b"upstream connect error"))
    response = post_chat(provider, "kraw")
    assert (response.status_code, response.content) == (503, b"upstream connect error")


def test_unknown_paths_and_missing_keys_answer_in_the_providers_shape(provider):
    response = httpx.get(provider.url + "/v1/nope", headers=bearer("k"))
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Invalid URL (GET /v1/nope)"
    response = httpx.post(provider.url + "/v1beta/models/g:generateContent", json={})
    assert response.status_code == 403
    assert response.json()["error"]["status"] == "PERMISSION_DENIED"


def test_drop_after_cuts_the_stream_after_that_many_content_events(provider):
    provider.behave("k", Behaviour(drop_after=2))
    lines: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        stream_post(provider) as response,
    ):
        lines.extend(response.iter_lines())
    contents = [json.loads(d)["choices"][0]["delta"]["content"] for d in sse_data(lines)]
    assert contents == [chunk_text(0), chunk_text(1)]
    (received,) = provider.requests
    assert (received.dropped, received.events_sent, received.finished) == (True, 2, False)


def test_drop_after_makes_the_openai_sdk_fail_mid_stream(provider):
    provider.behave("sk-drop", Behaviour(drop_after=1))
    stream = openai_client(provider, "sk-drop").chat.completions.create(
        model="m", messages=[], stream=True
    )
    seen: list[object] = []
    with pytest.raises(openai.APIConnectionError):
        seen.extend(stream)
    assert len(seen) == 1


def test_drop_after_on_a_plain_request_closes_without_an_answer(provider):
    provider.behave("k", Behaviour(drop_after=0))
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(provider.url + "/v1/messages", json={}, headers={"x-api-key": "k"})


def test_reset_alone_resets_the_connection_before_anything_is_sent(provider):
    provider.behave("k", Behaviour(reset=True))
    with pytest.raises(httpx.ReadError, match="reset"):
        post_chat(provider, json={})
    (received,) = provider.requests
    assert (received.dropped, received.status, received.finished) == (True, None, False)


def test_reset_with_drop_after_resets_the_stream_at_the_cut(provider):
    provider.behave("k", Behaviour(drop_after=1, event_interval=0.05, reset=True,
                                   compress=False))  # fmt: skip
    lines: list[str] = []
    with pytest.raises(httpx.ReadError), stream_post(provider) as response:
        lines.extend(response.iter_lines())
    (received,) = provider.requests
    assert (received.dropped, received.events_sent) == (True, 1)
    assert len(sse_data(lines)) <= 1  # a reset may lose what was not yet read


def test_cut_body_sends_half_a_plain_answer_then_closes(provider):
    provider.behave("k", Behaviour(cut_body=True, compress=False))
    with socket.create_connection(("127.0.0.1", provider.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: f\r\n"
                     b"Authorization: Bearer k\r\nContent-Length: 2\r\n\r\n{}")  # fmt: skip
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body) == length // 2
    assert provider.requests[0].dropped


def test_body_delay_holds_a_plain_answer_halfway(provider):
    provider.behave("k", Behaviour(body_delay=0.3))
    with httpx.stream("POST", provider.url + CHAT, json={}, headers=bearer("k")) as response:
        began = time.monotonic()
        assert response.status_code == 200
        body = response.read()
        assert time.monotonic() - began >= 0.25  # the headers came a moment before the wait
    assert json.loads(body)["choices"][0]["message"]["content"] == full_text()
    # The handler notes its end just after its last write, which the client may read first.
    deadline = time.monotonic() + 2
    while not provider.requests[0].finished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert provider.requests[0].finished


def test_a_client_leaving_during_the_body_delay_is_recorded(provider):
    provider.behave("k", Behaviour(body_delay=5))
    with httpx.stream("POST", provider.url + CHAT, json={}, headers=bearer("k")) as response:
        assert response.status_code == 200
    assert provider.wait_for_disconnects(1, timeout=2)
    assert provider.wait_until(lambda: provider.in_progress == 0, timeout=2)


def test_malformed_sse_opens_the_stream_with_unreadable_events(provider):
    provider.behave("k", Behaviour(malformed_sse=True, compress=False))
    with stream_post(provider, body={"stream": True}) as response:
        raw = response.read()
    assert raw.startswith(b"".join(MALFORMED_EVENTS))
    assert raw.endswith(b"data: [DONE]\n\n")  # the usual events follow
    with pytest.raises(json.JSONDecodeError):  # the SDK cannot read it
        list(openai_client(provider, "k").chat.completions.create(model="m", messages=[],
                                                                  stream=True))  # fmt: skip


def test_in_progress_counts_the_requests_being_answered(provider):
    provider.behave("k", Behaviour(first_byte_delay=0.3))
    assert provider.in_progress == 0
    with httpx.Client() as client:
        pending = threading.Thread(target=post_chat, args=(provider,), kwargs={"json": {}})
        pending.start()
        assert provider.wait_until(lambda: provider.in_progress == 1, timeout=2)
        pending.join()
        client.close()
    assert provider.wait_until(lambda: provider.in_progress == 0, timeout=2)


def test_event_interval_spaces_the_events(provider):
    provider.behave("k", Behaviour(event_interval=0.05, events=4))
    arrivals: list[float] = []
    with stream_post(provider, "/v1/messages", headers={"x-api-key": "k"}) as response:
        for line in response.iter_lines():
            if line == "event: content_block_delta":
                arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(gaps) == 3
    # Paced, not bunched: a late event shortens the next gap on a busy machine, so the
    # span is checked whole and each gap only loosely.
    assert 0.14 <= arrivals[-1] - arrivals[0] <= 0.6, gaps
    assert all(0.02 <= gap <= 0.3 for gap in gaps), gaps


def test_first_byte_delay_holds_the_headers(provider):
    provider.behave("k", Behaviour(first_byte_delay=0.2))
    began = time.monotonic()
    response = post_chat(provider, json={})
    assert response.status_code == 200
    assert time.monotonic() - began >= 0.2


@pytest.mark.parametrize(
    ("path", "request_kwargs", "source"),
    [
        (CHAT, {"headers": bearer("sk-a")}, "authorization"),
        ("/v1/messages", {"headers": {"x-api-key": "sk-a"}}, "x-api-key"),
        (
            "/v1beta/models/g:generateContent",
            {"headers": {"x-goog-api-key": "sk-a"}},
            "x-goog-api-key",
        ),
        ("/v1beta/models/g:generateContent", {"params": {"key": "sk-a"}}, "query"),
    ],
)
def test_it_records_the_key_from_each_credential_source(provider, path, request_kwargs, source):
    response = httpx.post(provider.url + path, json={"contents": []}, **request_kwargs)
    assert response.status_code == 200
    received = only_request(provider, "sk-a", source)
    assert received.credentials == {source: "sk-a"}
    assert provider.keys_used() == ["sk-a"]


def test_records_are_case_insensitive_and_clearable(provider):
    httpx.post(
        provider.url + CHAT + "?x=1",
        content=b"not json",
        headers={**bearer("k"), "X-Custom": "v"},
    )
    (received,) = provider.requests
    assert received.headers["x-custom"] == received.headers["X-CUSTOM"] == "v"
    assert (received.body, received.json, received.query) == (b"not json", None, {"x": "1"})
    provider.clear()
    assert provider.requests == []


def test_a_client_leaving_during_the_first_byte_delay_is_recorded(provider):
    provider.behave("k", Behaviour(first_byte_delay=5))
    with pytest.raises(httpx.ReadTimeout):
        post_chat(provider, json={}, timeout=0.1)
    assert provider.wait_for_disconnects(1, timeout=2)
    assert provider.requests[0].disconnected


def test_a_client_leaving_mid_stream_is_recorded(provider):
    provider.behave("k", Behaviour(event_interval=0.1))
    with stream_post(provider) as response:
        next(response.iter_lines())
    assert provider.wait_for_disconnects(1, timeout=2)
    (received,) = provider.requests
    assert received.disconnected
    assert received.events_sent < COMPLETION_TOKENS


def test_default_behaviour_applies_to_keys_without_their_own(provider):
    provider.behave_default(Behaviour(status=500))
    provider.behave("good", Behaviour())
    assert post_chat(provider, "other").status_code == 500
    assert post_chat(provider, "good").status_code == 200


def test_stop_cuts_a_stream_in_progress_quickly():
    provider = FakeProvider().start()
    provider.behave("k", Behaviour(event_interval=10))
    with stream_post(provider) as response:
        # Held, not dropped: a discarded httpx line iterator closes the response.
        lines = response.iter_lines()
        next(lines)
        began = time.monotonic()
        provider.stop()
        assert time.monotonic() - began < 1
        with pytest.raises(httpx.RemoteProtocolError):
            list(lines)
    assert provider.disconnects == 0
    assert not provider.requests[0].finished


@pytest.mark.parametrize(
    ("args", "encoding"), [([], "gzip"), (["--no-compress"], None)], ids=["default", "no-compress"]
)
def test_it_runs_standalone_for_a_benchmark(args, encoding):
    port = free_port()
    command = [sys.executable, str(ROOT / "tests" / "fakeprovider.py"), "--port", str(port), *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline().strip().endswith(f"127.0.0.1:{port}")
            response = httpx.post(
                f"http://127.0.0.1:{port}{CHAT}",
                json={},
                headers={**bearer("k"), "Accept-Encoding": "gzip"},
            )
            assert response.headers.get("content-encoding") == encoding
            assert response.json()["usage"]["total_tokens"] == TOTAL_TOKENS
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(5) == 0


# -- compression -----------------------------------------------------------------------


def decoder(coding: Coding) -> Callable[[bytes], bytes]:
    """An incremental decoder for `coding`, written here rather than borrowed from the
    clients, so that what the fake writes is checked byte for byte (httpx 0.28 has no zstd
    decoder without the `zstandard` package)."""
    if coding == "br":
        return brotli.Decompressor().process
    if coding == "zstd":
        return zstd.ZstdDecompressor().decompress
    wbits = 16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS
    return zlib.decompressobj(wbits).decompress


def accepting(coding: str, key: str = "k") -> dict[str, str]:
    return {**bearer(key), "Accept-Encoding": coding}


def raw_answer(
    provider: FakeProvider, path: str, headers: dict[str, str], body: Any = None
) -> tuple[httpx.Response, bytes]:
    """A POST and its body exactly as it came over the wire, still encoded."""
    with httpx.stream("POST", provider.url + path, json=body or {}, headers=headers) as response:
        return response, b"".join(response.iter_raw())


@pytest.mark.parametrize(
    ("accept_encoding", "chosen"),
    [
        (None, None),
        ("", None),
        ("identity", None),
        ("gzip", "gzip"),
        ("deflate, gzip", "gzip"),  # the server's order decides, not the client's
        ("gzip, deflate, br", "br"),
        ("gzip, deflate, br, zstd", "br"),
        ("zstd, gzip, deflate", "zstd"),
        ("br;q=0.1, gzip;q=1.0", "br"),  # a low q still accepts
        ("br;q=0, gzip", "gzip"),
        ("br; q=0.000, zstd;q=0, gzip ;q=0, deflate", "deflate"),
        ("*", "br"),
        ("br;q=0, *", "zstd"),
        ("*;q=0, deflate", "deflate"),
        ("identity;q=1, *;q=0", None),
        ("GZIP", "gzip"),
        ("x-gzip", "gzip"),
        ("gzip;q=0", None),
        ("gzip;q=zero", None),  # malformed: refused rather than guessed
        ("gzip;q=2", None),
        ("gzip, gzip;q=0", None),  # named twice: the refusal wins
        ("compress, identity", None),
    ],
)
def test_accept_encoding_negotiation(accept_encoding, chosen):
    assert choose_coding(accept_encoding) == chosen


def test_negotiation_keeps_to_the_codings_offered():
    assert choose_coding("br, zstd, gzip", ("gzip",)) == "gzip"
    assert choose_coding("br, zstd", ("gzip", "deflate")) is None
    assert choose_coding("gzip, deflate", ("deflate", "gzip")) == "deflate"


JSON_ANSWERS = {
    "openai-chat": (CHAT, bearer("k"), Behaviour()),
    "anthropic-429": ("/v1/messages", {"x-api-key": "k"}, Behaviour(status=429)),
    "gemini-generate": ("/v1beta/models/g:generateContent", {"x-goog-api-key": "k"}, Behaviour()),
    "openai-404": ("/v1/nope", bearer("k"), Behaviour()),
    "raw-503": (CHAT, bearer("k"), Behaviour(status=503, body=b"upstream connect error")),
}


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("answer", JSON_ANSWERS)
def test_json_answers_come_compressed_in_the_accepted_coding(provider, coding, answer):
    path, headers, behaviour = JSON_ANSWERS[answer]
    provider.behave("k", behaviour)
    plain = httpx.post(
        provider.url + path, json={}, headers={**headers, "Accept-Encoding": "*;q=0"}
    )
    assert "content-encoding" not in plain.headers
    response, wire = raw_answer(provider, path, {**headers, "Accept-Encoding": coding})
    assert response.status_code == plain.status_code
    assert response.headers["content-encoding"] == coding
    assert response.headers["vary"] == "Accept-Encoding"
    assert int(response.headers["content-length"]) == len(wire)
    body = decoder(coding)(wire)
    assert wire != body
    if answer.startswith("raw"):
        assert body == plain.content
    elif answer.endswith(("429", "404")):
        assert json.loads(body) == plain.json()
    else:
        assert full_text() in body.decode()
    assert provider.requests[-1].encoding == coding


@pytest.mark.parametrize("coding", CODINGS)
async def test_aiohttp_decodes_every_coding(provider, coding):
    # aiohttp reads zstd (through backports.zstd) as well as br, gzip and deflate.
    async with (
        aiohttp.ClientSession() as session,
        session.post(provider.url + CHAT, json={}, headers=accepting(coding)) as response,
    ):
        assert response.headers["Content-Encoding"] == coding
        answer = await response.json()
    assert answer["choices"][0]["message"]["content"] == full_text()


def test_the_sdks_get_br_and_read_it(provider):
    # Their httpx asks for "gzip, deflate, br" when brotli is installed, as it is here.
    openai_text = openai_client(provider).chat.completions.create(model="m", messages=[])
    assert openai_text.choices[0].message.content == full_text()
    with anthropic_client(provider).messages.stream(
        model="m", max_tokens=1, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        assert "".join(stream.text_stream) == full_text()
    client = gemini_client(provider)
    chunks = client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi")
    assert "".join(c.text or "" for c in chunks) == full_text()
    assert [r.encoding for r in provider.requests] == ["br", "br", "br"]


def test_a_client_that_does_not_ask_gets_no_compression(provider):
    with httpx.Client() as client:
        request = client.build_request("POST", provider.url + CHAT, json={}, headers=bearer("k"))
        del request.headers["Accept-Encoding"]
        response = client.send(request)
    assert "content-encoding" not in response.headers
    # The answer still depended on the header, which caches need to know.
    assert response.headers["vary"] == "Accept-Encoding"
    assert response.json()["choices"][0]["message"]["content"] == full_text()
    assert provider.requests[0].encoding is None


def test_compression_can_be_turned_off_per_key_or_narrowed(provider):
    provider.behave("plain", Behaviour(compress=False))
    provider.behave("google-like", Behaviour(codings=("gzip",)))
    response = httpx.post(provider.url + CHAT, json={}, headers=accepting("br, gzip", "plain"))
    assert "content-encoding" not in response.headers
    assert "vary" not in response.headers
    response = httpx.post(
        provider.url + CHAT, json={}, headers=accepting("br, gzip", "google-like")
    )
    assert response.headers["content-encoding"] == "gzip"
    response = httpx.post(provider.url + CHAT, json={}, headers=accepting("br", "google-like"))
    assert "content-encoding" not in response.headers
    assert [r.encoding for r in provider.requests] == [None, "gzip", None]
    with pytest.raises(ValueError, match="compress"):
        Behaviour(codings=("compress",))  # type: ignore[arg-type]


def test_a_provider_made_without_compression_never_compresses():
    with FakeProvider(compress=False) as provider:
        provider.behave("k", Behaviour(compress=True))
        with stream_post(provider, headers=accepting("gzip, br")) as response:
            assert "content-encoding" not in response.headers
            assert "vary" not in response.headers
            assert sse_data(list(response.iter_lines()))[-1] == "[DONE]"


def sse_payloads(text: str) -> list[Any]:
    return [json.loads(d) for d in sse_data(text.splitlines()) if d != "[DONE]"]


STREAMS: dict[str, tuple[str, dict[str, str], Callable[[str], list[str]], bytes]] = {
    # name: (path, headers, the content texts in a decoded body, its final frame's pattern)
    "openai-chat": (
        CHAT,
        bearer("k"),
        lambda text: [c["choices"][0]["delta"]["content"] for c in sse_payloads(text)[:-1]],
        rb"data: \[DONE\]\n\n\Z",
    ),
    "openai-responses": (
        "/v1/responses",
        bearer("k"),
        lambda text: [
            e["delta"] for e in sse_payloads(text) if e["type"] == "response.output_text.delta"
        ],
        rb"event: response\.completed\ndata: [^\n]*\n\n\Z",
    ),
    "anthropic": (
        "/v1/messages",
        {"x-api-key": "k"},
        lambda text: [
            e["delta"]["text"] for e in sse_payloads(text) if e["type"] == "content_block_delta"
        ],
        rb"event: message_stop\ndata: [^\n]*\n\n\Z",
    ),
    "gemini-sse": (
        "/v1beta/models/g:streamGenerateContent?alt=sse",
        {"x-goog-api-key": "k"},
        lambda text: [
            c["candidates"][0]["content"]["parts"][0]["text"] for c in sse_payloads(text)
        ],
        rb'"finishReason": "STOP"[^\n]*\r\n\r\n\Z',
    ),
    "gemini-array": (
        "/v1beta/models/g:streamGenerateContent",
        {"x-goog-api-key": "k"},
        lambda text: [c["candidates"][0]["content"]["parts"][0]["text"] for c in json.loads(text)],
        rb"\]\Z",
    ),
}


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("kind", STREAMS)
def test_streams_come_compressed_in_the_accepted_coding(provider, coding, kind):
    path, headers, texts, final = STREAMS[kind]
    response, wire = raw_answer(
        provider, path, {**headers, "Accept-Encoding": coding}, {"stream": True, "contents": []}
    )
    assert response.headers["content-encoding"] == coding
    assert response.headers["vary"] == "Accept-Encoding"
    assert "content-length" not in response.headers
    body = decoder(coding)(wire)
    assert texts(body.decode()) == [chunk_text(i) for i in range(COMPLETION_TOKENS)]
    assert re.search(final, body)
    (received,) = provider.requests
    assert (received.encoding, received.terminal_sent, received.finished) == (coding, True, True)


@pytest.mark.parametrize("coding", CODINGS)
async def test_compressed_stream_events_reach_a_decoding_client_one_at_a_time(provider, coding):
    provider.behave("k", Behaviour(events=3, event_interval=0.5))
    arrivals: list[float] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            provider.url + CHAT, json={"stream": True}, headers=accepting(coding)
        ) as response,
    ):
        assert response.headers["Content-Encoding"] == coding
        async for line in response.content:
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic())
                if len(arrivals) == 1:
                    # Decoded while the provider has yet to write the second event: each
                    # event is flushed through the compressor when it is written. (The
                    # count is updated once a write returns, so it may still read 0.)
                    assert provider.requests[0].events_sent < 2
    assert len(arrivals) == 3 + 1  # the content events and the finish_reason chunk
    gaps = [b - a for a, b in itertools.pairwise(arrivals[:3])]
    assert all(gap >= 0.3 for gap in gaps), gaps


@pytest.mark.parametrize("coding", CODINGS)
def test_drop_after_cuts_a_compressed_stream_after_what_was_written(provider, coding):
    provider.behave("k", Behaviour(drop_after=2))
    pieces: list[bytes] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        stream_post(provider, headers=accepting(coding)) as response,
    ):
        pieces.extend(response.iter_raw())
    assert response.headers["content-encoding"] == coding
    # No end of the coding came (no gzip trailer, no last brotli block): each event was
    # flushed on its own, and that is enough to read it.
    body = decoder(coding)(b"".join(pieces)).decode()
    contents = [
        json.loads(d)["choices"][0]["delta"]["content"] for d in sse_data(body.splitlines())
    ]
    assert contents == [chunk_text(0), chunk_text(1)]
    (received,) = provider.requests
    assert (received.dropped, received.terminal_sent, received.finished) == (True, False, False)


# -- errors that quote the key ---------------------------------------------------------

LEAKY_KEY = "sk-proj-0123456789abcdefABCDEF"


def test_openai_401_quotes_the_whole_key(provider):
    provider.behave(LEAKY_KEY, Behaviour(status=401))
    with pytest.raises(openai.AuthenticationError) as caught:
        openai_client(provider, LEAKY_KEY).chat.completions.create(model="m", messages=[])
    assert caught.value.code == "invalid_api_key"
    assert caught.value.body == {
        "message": f"Incorrect API key provided: {LEAKY_KEY}. You can find your API key"
        " at https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }


@pytest.mark.parametrize(
    ("path", "headers", "message"),
    [
        ("/v1/messages", {"x-api-key": LEAKY_KEY}, "invalid x-api-key"),
        (
            "/v1beta/models/g:generateContent",
            {"x-goog-api-key": LEAKY_KEY},
            "Request had invalid authentication credentials.",
        ),
        (
            "/v1beta/openai/chat/completions",
            bearer(LEAKY_KEY),
            "Request had invalid authentication credentials.",
        ),
    ],
)
def test_anthropic_and_gemini_401s_do_not_quote_the_key(provider, path, headers, message):
    provider.behave(LEAKY_KEY, Behaviour(status=401))
    response = httpx.post(provider.url + path, json={}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["message"] == message
    assert LEAKY_KEY not in response.text


def test_invalid_key_message_and_missing_keys_keep_their_texts(provider):
    provider.behave(LEAKY_KEY, Behaviour(invalid_key_message=True))
    response = post_chat(provider, LEAKY_KEY, json={})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": INVALID_KEY_MESSAGE,
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    response = httpx.post(provider.url + CHAT, json={})
    assert (response.status_code, response.json()["error"]["message"]) == (
        401,
        "You didn't provide an API key.",
    )
    response = httpx.post(provider.url + "/v1/messages", json={}, headers={"x-api-key": ""})
    assert (response.status_code, response.json()["error"]["message"]) == (
        401,
        "x-api-key header is required",
    )


def test_error_body_quotes_the_key_only_for_openai_401():
    quoted = error_body("openai", 401, key="sk-x")["error"]["message"]
    assert quoted.startswith("Incorrect API key provided: sk-x. ")
    assert error_body("openai", 401)["error"]["message"] == "Incorrect API key provided."
    assert error_body("openai", 401, "told", key="sk-x")["error"]["message"] == "told"
    assert "sk-x" not in json.dumps(error_body("openai", 403, key="sk-x"))
    assert "sk-x" not in json.dumps(error_body("anthropic", 401, key="sk-x"))
    assert "sk-x" not in json.dumps(error_body("gemini", 401, key="sk-x"))


# -- a stream held open after its last event -------------------------------------------


@pytest.mark.parametrize("kind", STREAMS)
def test_tail_delay_holds_the_body_open_after_the_final_frame(provider, kind):
    path, headers, _, final = STREAMS[kind]
    provider.behave("k", Behaviour(tail_delay=0.5))
    body = b""
    final_at = None
    started = time.monotonic()
    # httpx asks for br and decodes it as it arrives: the final frame is readable before
    # the br stream's end, which only comes with the body's.
    with httpx.stream(
        "POST", provider.url + path, json={"stream": True, "contents": []}, headers=headers
    ) as response:
        assert response.headers["content-encoding"] == "br"
        for piece in response.iter_bytes():
            body += piece
            if final_at is None and re.search(final, body):
                final_at = time.monotonic()
    ended_at = time.monotonic()
    assert final_at is not None
    # A lower bound whatever the machine's load (a busy client reads the final frame late,
    # which shortens the gap it sees): nothing else here waits, and sleeps never end early.
    assert ended_at - started >= 0.5
    (received,) = provider.requests
    assert (received.terminal_sent, received.finished, received.tail_cut) == (True, True, False)


def test_an_sdk_that_stops_at_the_final_event_cuts_the_tail_without_a_disconnect(provider):
    provider.behave("k", Behaviour(tail_delay=5))
    began = time.monotonic()
    # The sync OpenAI SDK breaks at `data: [DONE]` and closes the response there.
    stream = openai_client(provider, "k").chat.completions.create(
        model="m", messages=[], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == full_text()
    assert time.monotonic() - began < 2
    assert provider.wait_until(lambda: provider.requests[0].tail_cut, timeout=3)
    (received,) = provider.requests
    assert (received.terminal_sent, received.finished, received.disconnected) == (
        True,
        True,
        False,
    )
    assert provider.disconnects == 0


def test_leaving_before_the_final_event_is_still_a_disconnect_with_a_tail(provider):
    provider.behave("k", Behaviour(tail_delay=5, event_interval=0.2))
    with stream_post(provider) as response:
        next(response.iter_lines())
    assert provider.wait_for_disconnects(1, timeout=2)
    (received,) = provider.requests
    assert (received.terminal_sent, received.tail_cut, received.finished) == (False, False, False)


# -- rate-limit headers ----------------------------------------------------------------

RATELIMIT_HEADERS = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
]


def test_openai_ratelimit_headers_come_only_when_asked(provider):
    provider.behave("plain", Behaviour(status=429))
    provider.behave("waits", Behaviour(status=429, retry_after="2", ratelimit_headers=True))
    provider.behave("limited", Behaviour(status=429, ratelimit_headers=True))
    provider.behave("fine", Behaviour(ratelimit_headers=True))
    plain = post_chat(provider, "plain", json={})
    assert not set(RATELIMIT_HEADERS) & set(plain.headers)
    assert "retry-after" not in plain.headers
    waits = post_chat(provider, "waits", json={})
    assert waits.headers["retry-after"] == "2"
    assert (
        waits.headers["x-ratelimit-remaining-requests"],
        waits.headers["x-ratelimit-reset-requests"],
    ) == ("0", "2s")
    assert waits.headers["x-ratelimit-limit-requests"] == "500"
    limited = post_chat(provider, "limited", json={})
    assert limited.headers["x-ratelimit-reset-requests"] == "1s"
    fine = post_chat(provider, "fine", json={})
    assert fine.status_code == 200
    assert {h: fine.headers[h] for h in RATELIMIT_HEADERS} == openai_ratelimit_headers(200)
    assert fine.headers["x-ratelimit-remaining-requests"] == "499"


def test_ratelimit_headers_are_openais_alone(provider):
    provider.behave("k", Behaviour(status=429, ratelimit_headers=True))
    for path, headers in [
        ("/v1/messages", {"x-api-key": "k"}),
        ("/v1beta/models/g:generateContent", {"x-goog-api-key": "k"}),
    ]:
        response = httpx.post(provider.url + path, json={}, headers=headers)
        assert response.status_code == 429
        assert not set(RATELIMIT_HEADERS) & set(response.headers)


def test_a_quota_announces_what_is_left_and_refuses_once_spent(provider):
    provider.limit("k", Quota(requests=2, tokens=10_000, window=30))
    first, second, third = (post_chat(provider, "k", json={}) for _ in range(3))
    assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429)
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-remaining-tokens"] == str(10_000 - TOTAL_TOKENS)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"(29(\.\d+)?|30)s", second.headers["x-ratelimit-reset-requests"])
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert 29 <= int(third.headers["retry-after"]) <= 30
    assert "x-ratelimit-remaining-requests" not in post_chat(provider, "other", json={}).headers
    provider.limit("k", None)
    assert post_chat(provider, "k", json={}).status_code == 200


def test_a_quota_speaks_anthropics_headers_and_its_window_starts_again(provider):
    provider.limit("sk-ant-ok", Quota(tokens=TOTAL_TOKENS, window=1, style="anthropic"))
    answer = httpx.post(provider.url + "/v1/messages", json={"max_tokens": 5},
                        headers={"x-api-key": "sk-ant-ok"})  # fmt: skip
    assert answer.headers["anthropic-ratelimit-tokens-remaining"] == "0"
    assert answer.headers["anthropic-ratelimit-tokens-limit"] == str(TOTAL_TOKENS)
    reset = datetime.fromisoformat(answer.headers["anthropic-ratelimit-tokens-reset"])
    assert 0 < reset.timestamp() - time.time() <= 2
    assert "x-ratelimit-remaining-tokens" not in answer.headers
    with pytest.raises(anthropic.RateLimitError):
        anthropic_client(provider).messages.create(model="m", max_tokens=5, messages=[])
    time.sleep(1.1)
    assert anthropic_client(provider).messages.create(model="m", max_tokens=5, messages=[])


@pytest.mark.parametrize(
    ("seconds", "written"),
    [(0.032, "32ms"), (0.12, "120ms"), (1, "1s"), (2.5, "2.5s"), (360, "6m0s"), (90.5, "1m30.5s")],
)
def test_resets_are_written_as_openai_writes_them(seconds, written):
    assert duration(seconds) == written
