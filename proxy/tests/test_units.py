"""The proxy's pure parts: usage reading, model lists, durations, the log buffer bound."""

from __future__ import annotations

import gzip

import orjson
import pytest

from gptload.lib.providers import provider_for
from gptload.lib.secrets import mask_in
from keys.states import parse_duration
from logs.writer import LogEntry
from proxy import modellist
from proxy.recorder import Recorder
from proxy.usage import UsageTap
from tests.codings import CODINGS, compress

OPENAI = provider_for("openai")


def sse(*payloads: object, sep: bytes = b"\n\n") -> bytes:
    return b"".join(b"data: " + orjson.dumps(p) + sep for p in payloads)


def chunk(text: str) -> dict[str, object]:
    return {"choices": [{"delta": {"content": text}}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}


def run(tap: UsageTap, parts: list[bytes]) -> bytes:
    return b"".join(tap.feed(p) for p in parts) + tap.finish()


def test_usage_is_read_from_an_sse_stream_split_anywhere():
    body = sse(chunk("a"), chunk("b"), USAGE) + b"data: [DONE]\n\n"
    for size in (1, 7, 64, len(body)):
        tap = UsageTap(OPENAI, sse=True, encoding="", strip=False)
        out = run(tap, [body[i : i + size] for i in range(0, len(body), size)])
        assert out == body  # passed on untouched
        assert tap.usage is not None
        assert (tap.usage.prompt_tokens, tap.usage.completion_tokens) == (3, 4)


def test_the_usage_chunk_gptload_asked_for_is_taken_out_again_even_with_crlf():
    body = sse(chunk("a"), USAGE, sep=b"\r\n\r\n") + b"data: [DONE]\r\n\r\n"
    tap = UsageTap(OPENAI, sse=True, encoding="", strip=True)
    out = run(tap, [body[i : i + 5] for i in range(0, len(body), 5)])
    assert b'"usage"' not in out
    assert out.count(b"data: ") == 2
    assert out.endswith(b"[DONE]\r\n\r\n")
    assert tap.usage is not None
    assert tap.usage.total_tokens == 7


def test_usage_is_read_through_gzip_and_from_the_tail_of_a_big_body():
    body = orjson.dumps({"id": "x", "usage": {"prompt_tokens": 5, "completion_tokens": 6}})
    tap = UsageTap(OPENAI, sse=False, encoding="gzip", strip=False)
    packed = gzip.compress(body)
    assert run(tap, [packed[:10], packed[10:]]) == packed
    assert tap.usage is not None
    assert tap.usage.total_tokens == 11
    big = b'{"pad": "' + b"x" * (2 << 20) + b'", "usage": {"prompt_tokens": 1}}'
    tap = UsageTap(OPENAI, sse=False, encoding="", strip=False)
    run(tap, [big[i : i + 65536] for i in range(0, len(big), 65536)])
    assert tap.usage is not None
    assert tap.usage.prompt_tokens == 1


@pytest.mark.parametrize("encoding", CODINGS)
def test_usage_and_the_last_event_are_read_through_every_encoding(encoding):
    body = sse(chunk("a"), USAGE) + b"data: [DONE]\n\n"
    packed = compress(body, encoding)
    tap = UsageTap(OPENAI, sse=True, encoding=encoding, strip=True)
    parts = [packed[i : i + 7] for i in range(0, len(packed), 7)]
    assert run(tap, parts) == packed  # the client gets the upstream's bytes
    assert tap.usage is not None
    assert tap.usage.total_tokens == 7
    assert tap.terminal


def test_an_unknown_or_corrupt_encoding_passes_through_unread():
    for encoding in ("compress", "br"):
        tap = UsageTap(OPENAI, sse=True, encoding=encoding, strip=False)
        assert run(tap, [b"\x8b\x00garbage"]) == b"\x8b\x00garbage"
        assert tap.usage is None


def test_a_stream_without_its_last_event_is_not_complete():
    tap = UsageTap(OPENAI, sse=True, encoding="", strip=False)
    run(tap, [sse(chunk("a"), chunk("b"))])
    assert not tap.terminal


@pytest.mark.parametrize(
    ("channel", "last"),
    [
        ("anthropic", {"type": "message_stop"}),
        ("openai-response", {"type": "response.completed", "response": {"usage": {}}}),
        ("gemini", {"candidates": [{"finishReason": "STOP"}]}),
    ],
)
def test_each_providers_last_event_is_known(channel, last):
    tap = UsageTap(provider_for(channel), sse=True, encoding="", strip=False)
    run(tap, [sse({"type": "ping", "candidates": [{"content": {}}]})])
    assert not tap.terminal
    run(tap, [sse(last)])
    assert tap.terminal


def test_anthropic_and_gemini_usage_add_up_across_events():
    claude = UsageTap(provider_for("anthropic"), sse=True, encoding="", strip=False)
    run(claude, [sse({"type": "message_start", "message": {"usage": {"input_tokens": 9}}},
                     {"type": "message_delta", "usage": {"output_tokens": 2}})])  # fmt: skip
    assert claude.usage is not None
    assert (claude.usage.prompt_tokens, claude.usage.completion_tokens) == (9, 2)
    gemini = UsageTap(provider_for("gemini"), sse=False, encoding="", strip=False)
    meta = {"promptTokenCount": 4, "candidatesTokenCount": 5, "thoughtsTokenCount": 1}
    run(gemini, [orjson.dumps([{"usageMetadata": meta}])[:-1], b"]"])
    assert gemini.usage is not None
    assert gemini.usage.completion_tokens == 6


@pytest.mark.parametrize(
    ("strict", "first_page", "expected"),
    [(True, True, ["alias"]), (False, True, ["up", "alias"]), (False, False, ["up"])],
)
def test_gemini_model_lists(strict, first_page, expected):
    body = orjson.dumps({"models": [{"name": "models/up"}], "nextPageToken": "t"})
    rewritten = orjson.loads(modellist.rewrite(body, ["alias"], strict, first_page) or b"")
    assert [m["name"].removeprefix("models/") for m in rewritten["models"]] == expected
    assert ("nextPageToken" in rewritten) is not strict


def test_model_list_paths_and_foreign_bodies():
    assert modellist.is_model_list("GET", "/v1/models")
    assert modellist.is_model_list("GET", "/v1beta/openai/models/")
    assert not modellist.is_model_list("POST", "/v1/models")
    assert not modellist.is_model_list("GET", "/v1/models/gpt-4o")
    assert modellist.rewrite(b"not json", ["a"], True, True) is None
    assert modellist.rewrite(b'{"object": "x"}', ["a"], True, True) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20", 20.0), ("1.5s", 1.5), ("6m0s", 360.0), ("250ms", 1.0), ("", None), ("soon", None)],
)
def test_rate_limit_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_keys_are_masked_in_text_and_bytes():
    secret = "sk-abcdefghijklmnop"
    assert secret not in mask_in(f"bad key {secret}!", secret)
    assert secret.encode() not in mask_in(b"key=" + secret.encode(), secret)
    assert mask_in("nothing here", secret) == "nothing here"


async def test_the_log_buffer_is_bounded_and_counts_what_it_drops():
    recorder = Recorder(limit=2)
    recorder.configure(60)
    for _ in range(3):
        recorder.record(LogEntry(0.0, 1, "g", None, "", None, "", "", "m", 200, "", True, 1, "",
                              "/", "", False))  # fmt: skip
    assert (len(recorder.buffer), recorder.dropped) == (2, 1)
    assert recorder._task is not None
    recorder._task.cancel()
