"""The proxied request, top to bottom: resolve group → authenticate → choose key and
upstream → build the upstream request → send → stream back → report the key's outcome."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import orjson
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase

from gptload.lib.secrets import constant_time_in, mask
from keys.models import KeyStatus
from proxy.providers.base import Outbound, Provider, looks_like_invalid_key, parse_error_message
from proxy.providers.openai import OpenAIProvider
from proxy.runtime import now, runtime
from proxy.snapshot import GroupView, KeyEntry, Snapshot

log = logging.getLogger("gptload.proxy")
DEFAULT_COOLDOWN = 60.0
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "host", "content-length"})  # fmt: skip
DEFAULT_PROVIDER = OpenAIProvider()


class ProxyError(Exception):
    """gptload's own refusal, answered in the caller's provider shape."""

    def __init__(
        self, status: int, message: str, kind: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.retry_after = status, message, kind, retry_after

    def response(self, provider: Provider) -> HttpResponse:
        response = HttpResponse(
            provider.error_body(self.status, self.message, self.kind),
            status=self.status,
            content_type="application/json",
        )
        if self.retry_after is not None:
            response["Retry-After"] = str(max(1, round(self.retry_after)))
        return response


@dataclass
class Call:
    """One client request as it moves through the pipeline."""

    group: GroupView
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    json: dict[str, Any] | None
    stream: bool
    tried: set[int] = field(default_factory=set)


async def proxy(request: HttpRequest, group_name: str, path: str) -> HttpResponseBase:
    started = time.perf_counter()
    snapshot = await runtime.current()
    group = snapshot.groups.get(group_name)
    provider = group.provider if group else DEFAULT_PROVIDER
    response: HttpResponseBase
    try:
        group = authorize(request, snapshot, group, group_name)
        call = prepare(request, group, path)
        response = await forward(call)
    except ProxyError as error:
        response = error.response(provider)
    response["X-Gptload-Overhead-Ms"] = f"{(time.perf_counter() - started) * 1000:.2f}"
    return response


def credential_of(request: HttpRequest) -> str:
    query_key = request.GET.get("key")
    if query_key:
        return query_key
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:].strip()
    return request.headers.get("X-Api-Key") or request.headers.get("X-Goog-Api-Key") or ""


def authorize(
    request: HttpRequest, snapshot: Snapshot, group: GroupView | None, name: str
) -> GroupView:
    credential = credential_of(request)
    if not credential:
        raise ProxyError(
            401,
            "Missing proxy key: send it as Authorization: Bearer, x-api-key, x-goog-api-key or ?key=.",
            "authentication_error",
        )
    if group is None:
        raise ProxyError(404, f"No group named {name!r}.", "not_found_error")
    if not constant_time_in(credential, group.proxy_keys + snapshot.global_proxy_keys):
        raise ProxyError(401, "Invalid proxy key.", "authentication_error")
    if not group.enabled:
        raise ProxyError(403, f"Group {name!r} is disabled.", "permission_error")
    if group.is_aggregate:
        at = now()
        member = group.members.pick(lambda m: m.enabled and m.ring.has_usable(at))
        if member is None:
            raise ProxyError(
                503,
                "No member group of this aggregate has a usable key.",
                "no_keys_available",
                DEFAULT_COOLDOWN,
            )
        return member
    return group


def prepare(request: HttpRequest, group: GroupView, path: str) -> Call:
    provider = group.provider
    query = [
        (k, v)
        for k, v in parse_qsl(request.META.get("QUERY_STRING", ""), keep_blank_values=True)
        if k != "key"
    ]
    headers = {
        k.lower(): v
        for k, v in request.headers.items()
        if k.lower() not in HOP_BY_HOP and k.lower() not in CREDENTIAL_HEADERS
    }
    body = request.body
    data: dict[str, Any] | None = None
    if body[:1] == b"{":
        try:
            parsed = orjson.loads(body)
            data = parsed if isinstance(parsed, dict) else None
        except orjson.JSONDecodeError:
            data = None
    path = "/" + path.lstrip("/")
    changed = False
    model = provider.model_of(path, data)
    if group.redirects or group.strict:
        target = group.redirects.get(model)
        if target is None and group.strict and model:
            raise ProxyError(
                400, f"Model {model!r} is not configured for this group.", "invalid_request_error"
            )
        if target:
            path = provider.set_model(path, data, target)
            changed = data is not None
    if data is not None and group.param_overrides:
        data.update(group.param_overrides)
        changed = True
    stream = provider.is_stream(path, query, headers.get("accept", ""), data)
    if changed and data is not None:
        body = orjson.dumps(data)
    return Call(group, request.method or "GET", path, query, headers, body, data, stream)


async def forward(call: Call) -> HttpResponseBase:
    group = call.group
    attempts = int(group.settings["max_retries"]) + 1
    last: tuple[int, bytes, dict[str, str]] | None = None
    for attempt in range(attempts):
        key = group.ring.pick(now(), call.tried)
        if key is None:
            break
        call.tried.add(key.id)
        upstream = group.upstreams.pick()
        try:
            response = await send(call, key, upstream)
        except httpx.TransportError as exc:
            note_failure(group, key, f"{type(exc).__name__}: {mask_in(str(exc), key)}")
            last = (
                502,
                group.provider.error_body(
                    502, f"Upstream unreachable: {mask_in(str(exc), key)}", "upstream_error"
                ),
                {},
            )
            continue
        status = response.status_code
        if status in group.failover_codes:
            body = await response.aread()
            await response.aclose()
            judge_failure(group, key, status, response.headers, body)
            last = (
                status,
                mask_in_bytes(body, key),
                {"content-type": response.headers.get("content-type", "application/json")},
            )
            if attempt + 1 < attempts:
                continue
            break
        if status < 400:
            note_success(key)
        return relay(call, response)
    if last is not None:
        status, body, headers = last
        return HttpResponse(body, status=status, headers=headers)
    wait = group.ring.next_ready_in(now())
    raise ProxyError(
        503,
        "No usable upstream key in this group right now.",
        "no_keys_available",
        wait if wait is not None else DEFAULT_COOLDOWN,
    )


async def send(call: Call, key: KeyEntry, upstream: str) -> httpx.Response:
    group = call.group
    outbound = Outbound(call.path, list(call.query), dict(call.headers))
    group.provider.inject_key(outbound, key.secret)
    apply_header_rules(outbound, group, key)
    url = upstream + outbound.path + ("?" + urlencode(outbound.query) if outbound.query else "")
    settings = group.settings
    timeout = httpx.Timeout(
        connect=settings["connect_timeout"],
        read=None if call.stream else settings["request_timeout"],
        write=settings["request_timeout"],
        pool=settings["connect_timeout"],
    )
    request = runtime.http().build_request(
        call.method, url, headers=outbound.headers, content=call.body or None, timeout=timeout
    )
    return await runtime.http().send(request, stream=True)


def apply_header_rules(outbound: Outbound, group: GroupView, key: KeyEntry) -> None:
    if not group.header_rules:
        return
    variables = {"${GROUP_NAME}": group.name, "${API_KEY}": key.secret,
                 "${TIMESTAMP_MS}": str(int(time.time() * 1000)), "${TIMESTAMP_S}": str(int(time.time()))}  # fmt: skip
    for rule in group.header_rules:
        name = rule["key"].lower()
        if rule.get("action", "set") == "remove":
            outbound.headers.pop(name, None)
            continue
        value = rule.get("value", "")
        for var, replacement in variables.items():
            value = value.replace(var, replacement)
        outbound.headers[name] = value


def relay(call: Call, upstream: httpx.Response) -> StreamingHttpResponse:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
    if call.stream:
        headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
        headers.pop("content-length", None)
    elif "content-length" in upstream.headers:
        headers["content-length"] = upstream.headers["content-length"]
    return StreamingHttpResponse(
        pass_through(upstream), status=upstream.status_code, headers=headers
    )


async def pass_through(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        await upstream.aclose()


def note_success(key: KeyEntry) -> None:
    if key.consecutive_failures or key.status != KeyStatus.ACTIVE:
        key.consecutive_failures, key.status, key.cooling_until = 0, KeyStatus.ACTIVE, 0.0
        runtime.key_changed(key)


def note_failure(group: GroupView, key: KeyEntry, error: str) -> None:
    key.consecutive_failures += 1
    threshold = int(group.settings["blacklist_threshold"])
    if threshold and key.consecutive_failures >= threshold:
        bench(group, key)
    runtime.key_changed(key, error[:2048])


def judge_failure(
    group: GroupView, key: KeyEntry, status: int, headers: httpx.Headers, body: bytes
) -> None:
    message = mask_in(parse_error_message(body), key)
    error = f"[status {status}] {message}"
    if status in (401, 403) or looks_like_invalid_key(message):
        bench(group, key)
        runtime.key_changed(key, error)
    elif status == 429:
        key.status, key.cooling_until = KeyStatus.COOLING, now() + cooldown_of(headers)
        runtime.key_changed(key, error)
    elif status >= 500 or status == 408:
        note_failure(group, key, error)


def bench(group: GroupView, key: KeyEntry) -> None:
    key.status = KeyStatus.INVALID
    if key in group.ring.keys:
        group.ring.keys = [k for k in group.ring.keys if k is not key]


def cooldown_of(headers: httpx.Headers) -> float:
    """Seconds to rest a rate-limited key: Retry-After, else x-ratelimit-reset-*, else a default."""
    retry_after = headers.get("retry-after")
    if retry_after:
        try:
            return max(1.0, float(retry_after))
        except ValueError:
            try:
                return max(1.0, parsedate_to_datetime(retry_after).timestamp() - now())
            except (TypeError, ValueError):
                pass
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens", "x-ratelimit-reset"):
        if seconds := parse_duration(headers.get(name, "")):
            return seconds
    return DEFAULT_COOLDOWN


def parse_duration(text: str) -> float | None:
    """`20`, `1.5s`, `6m0s`, `250ms` → seconds."""
    import re

    if not text:
        return None
    try:
        return max(1.0, float(text))
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts:
        return None
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return max(1.0, sum(float(n) * scale[u] for n, u in parts))


def mask_in(text: str, key: KeyEntry) -> str:
    return text.replace(key.secret, mask(key.secret)) if key.secret in text else text


def mask_in_bytes(body: bytes, key: KeyEntry) -> bytes:
    secret = key.secret.encode()
    return body.replace(secret, mask(key.secret).encode()) if secret in body else body
