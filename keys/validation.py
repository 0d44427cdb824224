"""Validators for group fields, with GPT-Load's rules and messages a person can act on."""

from __future__ import annotations

import re
from typing import Any

from django.core.exceptions import ValidationError

from gptload.lib.urls import is_http_url

GROUP_NAME = re.compile(r"^[a-z0-9_-]{1,100}$")
HEADER_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
HEADER_ACTIONS = ("set", "remove")


def validate_group_name(value: str) -> None:
    if not GROUP_NAME.match(value):
        raise ValidationError(
            "Use 1-100 lowercase letters, digits, '-' or '_' (it becomes the URL segment "
            "/proxy/<name>/).",
            code="invalid_name",
        )


def validate_upstreams(value: Any) -> None:
    """A list of `{"url": "http(s)://…", "weight": n}`; weights ≥ 0, at least one > 0."""
    if not isinstance(value, list):
        raise ValidationError('Upstreams must be a list of {"url": ..., "weight": ...}.')
    seen: set[str] = set()
    for index, upstream in enumerate(value, start=1):
        if not isinstance(upstream, dict) or set(upstream) - {"url", "weight"}:
            raise ValidationError(f'Upstream {index}: expected {{"url": ..., "weight": ...}}.')
        url = upstream.get("url")
        if not isinstance(url, str) or not is_http_url(url):
            raise ValidationError(f"Upstream {index}: {url!r} is not an http:// or https:// URL.")
        weight = upstream.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ValidationError(f"Upstream {index}: weight must be a whole number ≥ 0.")
        if url.rstrip("/") in seen:
            raise ValidationError(f"Upstream {index}: {url} is listed twice.")
        seen.add(url.rstrip("/"))
    if value and not any(u.get("weight", 1) > 0 for u in value):
        raise ValidationError("At least one upstream needs a weight above 0 (0 switches one off).")


def validate_validation_endpoint(value: str) -> None:
    if value and (not value.startswith("/") or "://" in value):
        raise ValidationError("Use a path starting with '/', such as /v1/chat/completions.")


def validate_param_overrides(value: Any) -> None:
    if not isinstance(value, dict):
        raise ValidationError('Param overrides must be a JSON object, e.g. {"temperature": 0.2}.')


def canonical_header(name: str) -> str:
    """`x-api-key` → `X-Api-Key`, the way HTTP libraries canonicalise header names."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def validate_header_rules(value: Any) -> None:
    if not isinstance(value, list):
        raise ValidationError('Header rules must be a list of {"key", "value", "action"}.')
    seen: set[str] = set()
    for index, rule in enumerate(value, start=1):
        if not isinstance(rule, dict) or set(rule) - {"key", "value", "action"}:
            raise ValidationError(f'Header rule {index}: expected {{"key", "value", "action"}}.')
        key = rule.get("key")
        if not isinstance(key, str) or not HEADER_TOKEN.match(key.strip()):
            raise ValidationError(f"Header rule {index}: {key!r} is not a valid header name.")
        if rule.get("action", "set") not in HEADER_ACTIONS:
            raise ValidationError(f"Header rule {index}: action must be 'set' or 'remove'.")
        if not isinstance(rule.get("value", ""), str):
            raise ValidationError(f"Header rule {index}: value must be text.")
        canonical = canonical_header(key.strip())
        if canonical in seen:
            raise ValidationError(f"Header rule {index}: {canonical} has more than one rule.")
        seen.add(canonical)


def validate_model_redirect_rules(value: Any) -> None:
    if not isinstance(value, dict):
        raise ValidationError('Model redirects must be an object, e.g. {"gpt-4o": "gpt-4.1"}.')
    for source, target in value.items():
        if not isinstance(target, str) or not source.strip() or not target.strip():
            raise ValidationError(
                f"Model redirect {source!r} → {target!r}: both models must be non-empty text."
            )
