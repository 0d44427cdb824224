from __future__ import annotations

from proxy.providers.base import Provider


class OpenAIProvider(Provider):
    channel = "openai"

    def wants_usage_injection(self, path: str) -> bool:
        return path.endswith("/chat/completions")


class OpenAIResponsesProvider(OpenAIProvider):
    channel = "openai-response"
