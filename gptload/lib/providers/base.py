"""What gptload knows about a provider's wire format, for the proxy and the key checker.

One `Provider` per channel type answers every question that differs between them: where
the key goes, where the model is named, whether a call streams, how an error is shaped,
where token usage is reported, when a stream is complete, and how a key is checked (a
free model-list call, or GPT-Load's small generation call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

INVALID_KEY_HINTS = (
    "api key not valid",
    "invalid api key",
    "invalid x-api-key",
    "incorrect api key",
    "api_key_invalid",
)
PROBE_TEXT = "hi"


@dataclass
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


@dataclass
class Outbound:
    """The parts of an upstream request a provider may rewrite."""

    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]


@dataclass(frozen=True)
class ProbeCall:
    """A request that checks a key: method, path, query and JSON body (None: no body)."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    body: dict[str, Any] | None


class Provider:
    channel = ""
    label = ""
    default_upstream = ""
    default_test_model = ""  # the group form fills it in when this channel is picked
    key_header = "authorization"
    # GPT-Load's validation_endpoint applies to this channel (Gemini ignores it).
    takes_validation_endpoint = True

    def inject_key(self, outbound: Outbound, key: str) -> None:
        outbound.headers["authorization"] = f"Bearer {key}"

    def key_in_query(self, path: str) -> bool:
        """Whether the upstream key travels as `?key=` on this path (else in a header)."""
        return False

    def model_of(self, path: str, body: dict[str, Any] | None) -> str:
        model = body.get("model") if body else None
        return model if isinstance(model, str) else ""

    def set_model(self, path: str, body: dict[str, Any] | None, model: str) -> str:
        """Rewrites the model (in the body, or the path for Gemini); returns the path."""
        if body is not None:
            body["model"] = model
        return path

    def is_stream(
        self, path: str, query: list[tuple[str, str]], accept: str, body: dict[str, Any] | None
    ) -> bool:
        if "text/event-stream" in accept or ("stream", "true") in query:
            return True
        return bool(body and body.get("stream") is True)

    def error_body(self, status: int, message: str, kind: str) -> bytes:
        """gptload's own error, shaped so that the provider's SDK raises its typed error."""
        return orjson.dumps({"error": {"message": message, "type": kind, "code": kind}})

    def usage_of(self, data: Any) -> Usage | None:
        """Token usage in a JSON response body or one SSE event's data, if it has any."""
        usage = data.get("usage") if isinstance(data, dict) else None
        if not isinstance(usage, dict):
            return None
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        return Usage(_int(prompt), _int(completion))

    def wants_usage_injection(self, path: str) -> bool:
        return False

    # Bytes that the last event of a complete stream contains (searched before parsing).
    terminal_marks: tuple[bytes, ...] = (b"[DONE]",)

    def is_terminal(self, data: bytes, payload: Any) -> bool:
        """Whether one stream event (its raw `data:` and, when parsed, its JSON) is the
        last one of a complete answer: after it, nothing the client needs is left."""
        return data == b"[DONE]"

    def model_list_probe(self) -> ProbeCall:
        """The free call that authenticates a key: the provider's model list."""
        return ProbeCall("GET", "/v1/models", (), None)

    def generation_probe(self, model: str, endpoint: str) -> ProbeCall:
        """GPT-Load's check: a minimal generation call with the group's test model.

        No output cap: reasoning models refuse `max_tokens` with a 400, which would keep
        their keys invalid for ever; a one-word answer to "hi" costs next to nothing.
        """
        messages = [{"role": "user", "content": PROBE_TEXT}]
        path, _, query = (endpoint or "/v1/chat/completions").partition("?")
        return ProbeCall("POST", path, _query(query), {"model": model, "messages": messages})


def _query(text: str) -> tuple[tuple[str, str], ...]:
    from urllib.parse import parse_qsl

    return tuple(parse_qsl(text, keep_blank_values=True))


def parse_error_message(body: bytes) -> str:
    """The human message in an error body (GPT-Load's order), trimmed to 2048 characters."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors="replace").strip()[:2048]
    message: Any = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        message = message or data.get("error_msg") or (error if isinstance(error, str) else None)
        message = message or data.get("message")
    elif isinstance(data, list) and data and isinstance(data[0], dict):
        return parse_error_message(orjson.dumps(data[0]))
    text = message if isinstance(message, str) else body.decode(errors="replace")
    return text.strip()[:2048]


def looks_like_invalid_key(message: str) -> bool:
    lowered = message.lower()
    return any(hint in lowered for hint in INVALID_KEY_HINTS)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
