from __future__ import annotations

from typing import Any

from proxy.providers.base import Provider, Usage


class OpenAIProvider(Provider):
    channel = "openai"

    def wants_usage_injection(self, path: str) -> bool:
        return path.endswith("/chat/completions")


class OpenAIResponsesProvider(OpenAIProvider):
    channel = "openai-response"

    def usage_of(self, data: Any) -> Usage | None:
        # Streamed events carry the response object, with its usage once completed.
        if isinstance(data, dict) and isinstance(data.get("response"), dict):
            data = data["response"]
        return super().usage_of(data)
