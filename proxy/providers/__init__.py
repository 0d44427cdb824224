"""One module per provider format, behind the small interface of `base.Provider`."""

from __future__ import annotations

from proxy.providers.anthropic import AnthropicProvider
from proxy.providers.base import Provider
from proxy.providers.gemini import GeminiProvider
from proxy.providers.openai import OpenAIProvider, OpenAIResponsesProvider

PROVIDERS: dict[str, Provider] = {
    p.channel: p
    for p in (OpenAIProvider(), OpenAIResponsesProvider(), GeminiProvider(), AnthropicProvider())
}


def provider_for(channel: str) -> Provider:
    return PROVIDERS[channel]
