"""URL checks shared by the validators of stored configuration."""

from __future__ import annotations

from urllib.parse import urlsplit


def is_http_url(text: str) -> bool:
    """True if `text` is an absolute http:// or https:// URL with a host and a valid port.

    Never raises: a malformed URL (bad port, unbalanced IPv6 brackets) is simply not one.
    """
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)
