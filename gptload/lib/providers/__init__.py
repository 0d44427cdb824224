"""One module per provider format, behind the small interface of `base.Provider`.

Used by the proxy (requests, errors, usage, stream ends) and by the key checker
(probe calls): the one place that knows how the providers differ.
"""

from __future__ import annotations

from gptload.lib.providers.anthropic import AnthropicProvider
from gptload.lib.providers.base import Provider
from gptload.lib.providers.gemini import GeminiProvider
from gptload.lib.providers.openai import OpenAIProvider, OpenAIResponsesProvider

PROVIDERS: dict[str, Provider] = {
    p.channel: p
    for p in (OpenAIProvider(), OpenAIResponsesProvider(), GeminiProvider(), AnthropicProvider())
}


def provider_for(channel: str) -> Provider:
    return PROVIDERS[channel]
