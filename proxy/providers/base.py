"""What the proxy needs to know about a provider's wire format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

INVALID_KEY_HINTS = (
    "api key not valid",
    "invalid api key",
    "invalid x-api-key",
    "incorrect api key",
)


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


class Provider:
    channel = ""
    key_header = "authorization"

    def inject_key(self, outbound: Outbound, key: str) -> None:
        outbound.headers["authorization"] = f"Bearer {key}"

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
