from __future__ import annotations

from typing import Any

from gptload.lib.providers.base import PROBE_TEXT, ProbeCall, Provider, Usage, _query


class OpenAIProvider(Provider):
    channel = "openai"
    label = "OpenAI"
    default_upstream = "https://api.openai.com"
    default_test_model = "gpt-4.1-nano"

    def wants_usage_injection(self, path: str) -> bool:
        return path.endswith("/chat/completions")


class OpenAIResponsesProvider(OpenAIProvider):
    channel = "openai-response"
    label = "OpenAI Responses"

    def usage_of(self, data: Any) -> Usage | None:
        # Streamed events carry the response object, with its usage once completed.
        if isinstance(data, dict) and isinstance(data.get("response"), dict):
            data = data["response"]
        return super().usage_of(data)

    terminal_marks = (b"response.completed",)

    def is_terminal(self, data: bytes, payload: Any) -> bool:
        return b"response.completed" in data and _type(payload) == "response.completed"

    def generation_probe(self, model: str, endpoint: str) -> ProbeCall:
        path, _, query = (endpoint or "/v1/responses").partition("?")
        return ProbeCall("POST", path, _query(query), {"model": model, "input": PROBE_TEXT})


def _type(payload: Any) -> Any:
    return payload.get("type") if isinstance(payload, dict) else None
