"""Masking secrets for display, and judging whether a configured secret is weak."""

from __future__ import annotations

import hmac
from typing import AnyStr

DEFAULT_AUTH_KEY = "sk-123456"
WEAK_WORDS = ("password", "123456", "admin", "secret", "sk-123456")


def mask(secret: str) -> str:
    """`abcd…wxyz` for long secrets, `****` for short ones; never the whole value."""
    if len(secret) <= 8:
        return "****" if secret else ""
    return f"{secret[:4]}…{secret[-4:]}"


def weakness(secret: str) -> str | None:
    """Why a secret is weak, or None when it looks strong enough."""
    if not secret:
        return "it is empty"
    if secret == DEFAULT_AUTH_KEY:
        return "it is the published default sk-123456"
    lowered = secret.lower()
    for word in WEAK_WORDS:
        if word in lowered:
            return f"it contains {word!r}"
    if len(secret) < 16:
        return f"it is only {len(secret)} characters long (use 16 or more; 32+ recommended)"
    if len(set(secret)) < 6:
        return "it repeats too few distinct characters"
    return None


def constant_time_in(candidate: str, secrets: list[str] | tuple[str, ...]) -> bool:
    """Whether `candidate` equals one of `secrets`, comparing each in constant time."""
    found = False
    encoded = candidate.encode()
    for secret in secrets:
        found |= hmac.compare_digest(encoded, secret.encode())
    return found


def mask_in(text: AnyStr, secret: str) -> AnyStr:
    """`text` with every copy of `secret` replaced by its masked form (str or bytes)."""
    if not secret:
        return text
    if isinstance(text, bytes):
        raw = secret.encode()
        return text.replace(raw, mask(secret).encode()) if raw in text else text
    return text.replace(secret, mask(secret)) if secret in text else text
