from __future__ import annotations

from typing import Any

import orjson

from gptload.lib.providers.base import (
    PROBE_TEXT,
    Outbound,
    ProbeCall,
    Provider,
    Usage,
    _int,
    _query,
)

ANTHROPIC_VERSION = "2023-06-01"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error"}  # fmt: skip


class AnthropicProvider(Provider):
    channel = "anthropic"
    label = "Anthropic"
    default_upstream = "https://api.anthropic.com"
    default_test_model = "claude-3-haiku-20240307"
    key_header = "x-api-key"

    def inject_key(self, outbound: Outbound, key: str) -> None:
        outbound.headers["x-api-key"] = key
        # Unlike GPT-Load, a version the client chose is kept; one is set only when missing.
        outbound.headers.setdefault("anthropic-version", ANTHROPIC_VERSION)

    def error_body(self, status: int, message: str, kind: str) -> bytes:
        error_type = ERROR_TYPES.get(status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})

    def usage_of(self, data: Any) -> Usage | None:
        if not isinstance(data, dict):
            return None
        if data.get("type") == "message_start" and isinstance(data.get("message"), dict):
            data = data["message"]
        usage = data.get("usage")
        if not isinstance(usage, dict):
            return None
        return Usage(_int(usage.get("input_tokens")), _int(usage.get("output_tokens")))

    terminal_marks = (b"message_stop",)

    def is_terminal(self, data: bytes, payload: Any) -> bool:
        return (
            b"message_stop" in data
            and isinstance(payload, dict)
            and (payload.get("type") == "message_stop")
        )

    def model_list_probe(self) -> ProbeCall:
        return ProbeCall("GET", "/v1/models", (("limit", "1"),), None)

    def generation_probe(self, model: str, endpoint: str) -> ProbeCall:
        # Anthropic requires max_tokens, and 1 is enough.
        path, _, query = (endpoint or "/v1/messages").partition("?")
        body = {"model": model, "max_tokens": 1,
                "messages": [{"role": "user", "content": PROBE_TEXT}]}  # fmt: skip
        return ProbeCall("POST", path, _query(query), body)
