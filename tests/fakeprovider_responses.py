"""What the fake provider answers: each API's success bodies and stream events.

Token usage is deterministic: `PROMPT_TOKENS` in, one token per content chunk out
(`COMPLETION_TOKENS` with the default `DEFAULT_EVENTS` chunks), and chunk `i` reads
`chunk_text(i)` in every provider's answers. Errors live in `tests/fakeprovider_errors.py`,
routing, behaviours and compression in `tests/fakeprovider.py`, which re-exports the
public names here.
"""

from __future__ import annotations

import base64
import itertools
import json
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from tests.fakeprovider import Call

PROMPT_TOKENS = 11
DEFAULT_EVENTS = 5
COMPLETION_TOKENS = DEFAULT_EVENTS
TOTAL_TOKENS = PROMPT_TOKENS + COMPLETION_TOKENS
EMBEDDING_DIMENSIONS = 8
OPENAI_MODELS = ("gpt-4o-mini", "gpt-4.1")
ANTHROPIC_MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5")
GEMINI_MODELS = ("gemini-2.5-flash", "gemini-2.5-pro")

# One write to the client, and whether it is a content event (counted by `events`,
# `event_interval` and `drop_after`) rather than stream framing.
Frame = tuple[bytes, bool]


def chunk_text(index: int) -> str:
    """The text of content chunk `index` (0-based) in every provider's answers."""
    return f"tok{index} "


def full_text(events: int = DEFAULT_EVENTS) -> str:
    """The whole answer text: what a client assembles from `events` chunks."""
    return "".join(chunk_text(i) for i in range(events))


# -- OpenAI ----------------------------------------------------------------------------


def sse(payload: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


def openai_usage(completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion,
        "total_tokens": PROMPT_TOKENS + completion,
    }


async def openai_chat(call: Call) -> web.StreamResponse:
    if not call.received.stream:
        return call.json(
            {
                "id": call.id("chatcmpl-"),
                "object": "chat.completion",
                "created": call.created,
                "model": call.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": full_text(call.events),
                            "refusal": None,
                        },
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": openai_usage(call.events),
                "system_fingerprint": None,
            }
        )
    return await call.stream(openai_chat_frames(call), "text/event-stream")


def openai_chat_frames(call: Call) -> Iterator[Frame]:
    options = call.body.get("stream_options")
    with_usage = isinstance(options, dict) and options.get("include_usage") is True

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        payload: dict[str, Any] = {
            "id": call.id("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": call.created,
            "model": call.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if with_usage:
            payload["usage"] = None
        payload.update(extra)
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    for i in range(call.events):
        delta = (
            {"role": "assistant", "content": chunk_text(i)}
            if i == 0
            else {"content": chunk_text(i)}
        )
        yield chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]), True
    yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]), False
    if with_usage:
        yield chunk([], usage=openai_usage(call.events)), False
    yield b"data: [DONE]\n\n", False


def responses_message(call: Call, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {
        "id": call.id("msg_"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content if status == "completed" else [],
    }


def responses_object(call: Call, completed: bool) -> dict[str, Any]:
    usage = {
        "input_tokens": PROMPT_TOKENS,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": call.events,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": PROMPT_TOKENS + call.events,
    }
    return {
        "id": call.id("resp_"),
        "object": "response",
        "created_at": call.created,
        "status": "completed" if completed else "in_progress",
        "completed_at": call.created if completed else None,
        "model": call.model,
        "output": [responses_message(call, full_text(call.events), "completed")]
        if completed
        else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "temperature": 1.0,
        "top_p": 1.0,
        "text": {"format": {"type": "text"}},
        "usage": usage if completed else None,
    }


async def openai_responses(call: Call) -> web.StreamResponse:
    if not call.received.stream:
        return call.json(responses_object(call, completed=True))
    return await call.stream(responses_frames(call), "text/event-stream")


def responses_frames(call: Call) -> Iterator[Frame]:
    # The SDK's `responses.stream()` helper needs the output item and content part announced
    # before any text delta arrives, so the full event sequence is sent, not just the deltas.
    sequence = itertools.count()
    item_id = call.id("msg_")
    text = full_text(call.events)
    part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}

    def event(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, "sequence_number": next(sequence), **fields}, kind)

    yield event("response.created", response=responses_object(call, completed=False)), False
    yield event("response.in_progress", response=responses_object(call, completed=False)), False
    item = responses_message(call, "", "in_progress")
    yield event("response.output_item.added", output_index=0, item=item), False
    yield event("response.content_part.added", **where, part=part), False
    for i in range(call.events):
        yield event("response.output_text.delta", **where, delta=chunk_text(i), logprobs=[]), True
    yield event("response.output_text.done", **where, text=text, logprobs=[]), False
    yield event("response.content_part.done", **where, part={**part, "text": text}), False
    done = responses_message(call, text, "completed")
    yield event("response.output_item.done", output_index=0, item=done), False
    yield event("response.completed", response=responses_object(call, completed=True)), False


async def openai_embeddings(call: Call) -> web.StreamResponse:
    inputs = call.body.get("input")
    count = (
        len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
    )
    as_base64 = call.body.get("encoding_format") == "base64"
    data = []
    for i in range(count):
        vector = [round((i + 1) * 0.125 * (d + 1), 3) for d in range(EMBEDDING_DIMENSIONS)]
        embedding: object = vector
        if as_base64:
            # What the SDK asks for by default: little-endian float32, base64-encoded.
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    usage = {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS}
    return call.json({"object": "list", "data": data, "model": call.model, "usage": usage})


async def openai_models(call: Call) -> web.StreamResponse:
    data = [
        {"id": m, "object": "model", "created": 1700000000, "owned_by": "openai"}
        for m in OPENAI_MODELS
    ]
    return call.json({"object": "list", "data": data})


# -- Anthropic -------------------------------------------------------------------------


def anthropic_message(
    call: Call, content: list[dict[str, Any]], output_tokens: int
) -> dict[str, Any]:
    done = output_tokens == call.events and bool(content)
    return {
        "id": call.id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": content,
        "stop_reason": "end_turn" if done else None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": PROMPT_TOKENS,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


async def anthropic_messages(call: Call) -> web.StreamResponse:
    if not call.received.stream:
        content = [{"type": "text", "text": full_text(call.events)}]
        return call.json(anthropic_message(call, content, call.events))
    return await call.stream(anthropic_frames(call), "text/event-stream")


def anthropic_frames(call: Call) -> Iterator[Frame]:
    # The SDK skips SSE events without an `event:` line, so every one carries its type.
    def event(payload: dict[str, Any]) -> bytes:
        return sse(payload, payload["type"])

    # Like the real API, message_start reports 1 output token; message_delta's count is the
    # cumulative total and replaces it.
    yield event({"type": "message_start", "message": anthropic_message(call, [], 1)}), False
    block = {"type": "text", "text": ""}
    yield event({"type": "content_block_start", "index": 0, "content_block": block}), False
    for i in range(call.events):
        delta = {"type": "text_delta", "text": chunk_text(i)}
        yield event({"type": "content_block_delta", "index": 0, "delta": delta}), True
    yield event({"type": "content_block_stop", "index": 0}), False
    stop = {"stop_reason": "end_turn", "stop_sequence": None}
    usage = {"output_tokens": call.events}
    yield event({"type": "message_delta", "delta": stop, "usage": usage}), False
    yield event({"type": "message_stop"}), False


async def anthropic_models(call: Call) -> web.StreamResponse:
    data = [
        {
            "type": "model",
            "id": m,
            "display_name": m,
            "created_at": "2025-01-01T00:00:00Z",
            "lifecycle": "active",
        }
        for m in ANTHROPIC_MODELS
    ]
    return call.json(
        {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
    )


# -- Gemini ----------------------------------------------------------------------------


def gemini_response(call: Call, text: str, produced: int, last: bool) -> dict[str, Any]:
    candidate: dict[str, Any] = {
        "content": {"parts": [{"text": text}], "role": "model"},
        "index": 0,
    }
    if last:
        candidate["finishReason"] = "STOP"
    return {
        "candidates": [candidate],
        # As the real API does, every chunk carries usage so far; the last one is the total.
        "usageMetadata": {
            "promptTokenCount": PROMPT_TOKENS,
            "candidatesTokenCount": produced,
            "totalTokenCount": PROMPT_TOKENS + produced,
        },
        "modelVersion": call.model,
        "responseId": call.id("resp-"),
    }


async def gemini_generate(call: Call) -> web.StreamResponse:
    return call.json(gemini_response(call, full_text(call.events), call.events, last=True))


async def gemini_stream(call: Call) -> web.StreamResponse:
    if call.request.query.get("alt") == "sse":
        return await call.stream(gemini_sse_frames(call), "text/event-stream")
    return await call.stream(gemini_array_frames(call), "application/json")


def gemini_chunks(call: Call) -> Iterator[dict[str, Any]]:
    for i in range(call.events):
        yield gemini_response(call, chunk_text(i), i + 1, last=i == call.events - 1)


def gemini_sse_frames(call: Call) -> Iterator[Frame]:
    # The real API ends its SSE lines with CRLF.
    for chunk in gemini_chunks(call):
        yield f"data: {json.dumps(chunk)}\r\n\r\n".encode(), True


def gemini_array_frames(call: Call) -> Iterator[Frame]:
    # Without alt=sse the answer is one JSON array, written an element at a time.
    separator = b"["
    for chunk in gemini_chunks(call):
        yield separator + json.dumps(chunk).encode(), True
        separator = b",\r\n"
    yield (b"]" if separator != b"[" else b"[]"), False


async def gemini_models(call: Call) -> web.StreamResponse:
    models = [
        {
            "name": f"models/{m}",
            "version": "001",
            "displayName": m,
            "inputTokenLimit": 1048576,
            "outputTokenLimit": 65536,
            "supportedGenerationMethods": ["generateContent", "countTokens"],
        }
        for m in GEMINI_MODELS
    ]
    return call.json({"models": models})
