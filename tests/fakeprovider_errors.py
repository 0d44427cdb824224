"""What the fake provider answers when it fails: each API's error JSON and OpenAI's
rate-limit headers. `tests/fakeprovider.py` decides when, and re-exports the public names.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from tests.fakeprovider_responses import TOTAL_TOKENS

__all__ = ["INVALID_KEY_MESSAGE", "Family", "error_body", "openai_ratelimit_headers"]

Family = Literal["openai", "anthropic", "gemini"]

INVALID_KEY_MESSAGE = "API key not valid. Please pass a valid API key."
REASONS = {529: "Overloaded"}
OPENAI_INCORRECT_KEY = (
    "Incorrect API key provided: {key}."
    " You can find your API key at https://platform.openai.com/account/api-keys."
)
UNREGISTERED_CALLER = (
    "Method doesn't allow unregistered callers (callers without established identity)."
    " Please use API Key or other form of API consumer identity to call this API."
)
OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: ("invalid_request_error", "unknown_url", "Not found."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests. Please try again later.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", None, "The engine is currently overloaded, please try again later"),
}
ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: (
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}
GEMINI_ERRORS: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials."),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    404: ("NOT_FOUND", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    500: (
        "INTERNAL",
        "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
    ),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}


def error_body(
    family: Family,
    status: int,
    message: str | None = None,
    invalid_key: bool = False,
    key: str | None = None,
) -> dict[str, Any]:
    """The error JSON `family`'s API answers `status` with.

    `key` is the credential the request carried: OpenAI's 401 quotes it in its message
    (the real API masks its middle; the fake quotes all of it, so that a gateway which
    passes the message on unmasked leaks the whole key in tests). Anthropic and Gemini
    do not quote keys.
    """
    server = status >= 500
    if family == "openai":
        kind, code, text = OPENAI_ERRORS.get(
            status, ("server_error" if server else "invalid_request_error", None, f"HTTP {status}")
        )
        if status == 401 and key:
            text = OPENAI_INCORRECT_KEY.format(key=key)
        if invalid_key:
            code = "invalid_api_key"
        return {"error": {"message": message or text, "type": kind, "param": None, "code": code}}
    if family == "anthropic":
        kind, text = ANTHROPIC_ERRORS.get(
            status, ("api_error" if server else "invalid_request_error", f"HTTP {status}")
        )
        return {"type": "error", "error": {"type": kind, "message": message or text}}
    state, text = GEMINI_ERRORS.get(status, ("INTERNAL" if server else "UNKNOWN", f"HTTP {status}"))
    error: dict[str, Any] = {"code": status, "message": message or text, "status": state}
    if invalid_key:
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ]
    return {"error": error}


# A low-tier account's limits, in the range real `x-ratelimit-limit-*` headers show.
OPENAI_REQUEST_LIMIT = 500
OPENAI_TOKEN_LIMIT = 30000


def openai_ratelimit_headers(status: int, retry_after: str | None = None) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for an answer with `status`.

    A 429 has used up the requests, which come back after `retry_after` seconds (when it
    is a number; 1 s otherwise); any other answer has used one request and its tokens.
    """
    if status == 429:
        try:
            wait = float(retry_after) if retry_after is not None else 1.0
        except ValueError:
            wait = 1.0
        if not math.isfinite(wait) or wait < 0:
            wait = 1.0
        remaining, reset = 0, duration(wait)
    else:
        remaining, reset = OPENAI_REQUEST_LIMIT - 1, duration(0.12)
    return {
        "x-ratelimit-limit-requests": str(OPENAI_REQUEST_LIMIT),
        "x-ratelimit-limit-tokens": str(OPENAI_TOKEN_LIMIT),
        "x-ratelimit-remaining-requests": str(remaining),
        "x-ratelimit-remaining-tokens": str(OPENAI_TOKEN_LIMIT - TOTAL_TOKENS),
        "x-ratelimit-reset-requests": reset,
        "x-ratelimit-reset-tokens": duration(0.032),
    }


def duration(seconds: float) -> str:
    """`seconds` as OpenAI writes its resets: "120ms", "2s", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    if not minutes:
        return f"{rest:g}s"
    return f"{int(minutes)}m{rest:g}s"
