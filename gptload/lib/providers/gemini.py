from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import orjson

from gptload.lib.providers.base import PROBE_TEXT, Outbound, ProbeCall, Provider, Usage, _int

MODEL_IN_PATH = re.compile(r"/models/([^/:]+)(:[A-Za-z]+)?")
STATUSES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
            429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}  # fmt: skip


def is_openai_compatible(path: str) -> bool:
    return "/v1beta/openai/" in path


class GeminiProvider(Provider):
    channel = "gemini"
    label = "Gemini"
    default_upstream = "https://generativelanguage.googleapis.com"
    default_test_model = "gemini-2.0-flash-lite"
    key_header = "x-goog-api-key"
    takes_validation_endpoint = False

    def inject_key(self, outbound: Outbound, key: str) -> None:
        if is_openai_compatible(outbound.path):
            super().inject_key(outbound, key)
            return
        outbound.query = [(k, v) for k, v in outbound.query if k != "key"] + [("key", key)]

    def key_in_query(self, path: str) -> bool:
        return not is_openai_compatible(path)

    def model_of(self, path: str, body: dict[str, Any] | None) -> str:
        if not is_openai_compatible(path) and (match := MODEL_IN_PATH.search(path)):
            return match[1]
        return super().model_of(path, body)

    def set_model(self, path: str, body: dict[str, Any] | None, model: str) -> str:
        if is_openai_compatible(path):
            return super().set_model(path, body, model)
        return MODEL_IN_PATH.sub(lambda m: f"/models/{model}{m[2] or ''}", path, count=1)

    def is_stream(
        self, path: str, query: list[tuple[str, str]], accept: str, body: dict[str, Any] | None
    ) -> bool:
        return (
            ":streamGenerateContent" in path
            or ("alt", "sse") in query
            or super().is_stream(path, query, accept, body)
        )

    def wants_usage_injection(self, path: str) -> bool:
        return is_openai_compatible(path) and path.endswith("/chat/completions")

    def error_body(self, status: int, message: str, kind: str) -> bytes:
        error = {"code": status, "message": message, "status": STATUSES.get(status, "UNKNOWN")}
        return orjson.dumps({"error": error})

    def usage_of(self, data: Any) -> Usage | None:
        usage = data.get("usageMetadata") if isinstance(data, dict) else None
        if not isinstance(usage, dict):
            return super().usage_of(data)
        completion = _int(usage.get("candidatesTokenCount"))
        thoughts = _int(usage.get("thoughtsTokenCount"))
        if thoughts is not None:
            completion = (completion or 0) + thoughts
        return Usage(_int(usage.get("promptTokenCount")), completion)

    terminal_marks = (b"finishReason", b"[DONE]")

    def is_terminal(self, data: bytes, payload: Any) -> bool:
        """Gemini has no closing event: its last chunk names why the candidate finished.

        Its OpenAI-compatible streams end with `[DONE]` like OpenAI's.
        """
        if data == b"[DONE]":
            return True
        if b"finishReason" not in data:
            return False
        items = payload if isinstance(payload, list) else [payload]
        return any(
            isinstance(c, dict) and c.get("finishReason")
            for item in items
            if isinstance(item, dict)
            for c in item.get("candidates") or ()
        )

    def model_list_probe(self) -> ProbeCall:
        return ProbeCall("GET", "/v1beta/models", (("pageSize", "1"),), None)

    def generation_probe(self, model: str, endpoint: str) -> ProbeCall:
        name = quote(model.removeprefix("models/"), safe="")
        contents = [{"role": "user", "parts": [{"text": PROBE_TEXT}]}]
        return ProbeCall(
            "POST", f"/v1beta/models/{name}:generateContent", (), {"contents": contents}
        )
