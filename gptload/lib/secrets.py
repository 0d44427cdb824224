"""Masking secrets for display, and judging whether a configured secret is weak."""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import time
from pathlib import Path
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
        return "it is GPT-Load's published default sk-123456"
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


# Credentials as they appear in text that gptload did not write itself (an upstream's
# error, a library's log line, a URL): a `key=` query parameter, a Bearer token, the
# key headers, and the key shapes of the providers gptload serves.
CREDENTIALS = re.compile(
    r"(?P<lead>(?:[?&;]key=)|(?:\bBearer\s+)|(?:\b(?:x-api-key|x-goog-api-key|api[_-]?key)"
    r"[\"']?\s*[:=]\s*[\"']?))(?P<secret>[^\s&\"',;}]{6,})"
    r"|(?P<bare>\b(?:sk-[A-Za-z0-9_\-]{16,}|AIza[0-9A-Za-z_\-]{30,}))",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with every credential-looking value masked (`mask`): the one pass that
    server log lines go through (`Redacting`), whatever logger wrote them."""
    if not text:
        return text

    def masked(match: re.Match[str]) -> str:
        if match.group("bare"):
            return mask(match.group("bare"))
        return match.group("lead") + mask(match.group("secret"))

    return CREDENTIALS.sub(masked, text)


class Redacting(logging.Filter):
    """Masks credentials in every record a handler writes: the formatted message, and an
    exception's text (a library's error may carry a URL with `?key=`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def stored_secret(path: Path, prefix: str = "") -> tuple[str, bool]:
    """The secret kept in `path`, made (strong, random) and stored with mode 0600 the
    first time; returns it and whether it was made now. Two processes starting at once
    agree: the file is created exclusively, and the other one reads what was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(100):  # the maker may be between creating the file and writing it
            if text := path.read_text().strip():
                return text, False
            time.sleep(0.02)
        raise RuntimeError(f"{path} is empty: delete it to have a new secret made") from None
    made = prefix + secrets.token_urlsafe(36)
    with os.fdopen(descriptor, "w") as file:
        file.write(made + "\n")
    return made, True
