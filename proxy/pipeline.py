"""The proxied request, top to bottom: resolve group → authenticate → choose key and
upstream → build the upstream request → send → stream back → report the key's outcome
→ record the attempt."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, AnyStr
from urllib.parse import parse_qsl, urlencode

import httpx
import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase

from gptload.lib.secrets import constant_time_in, mask
from keys.models import KeyStatus
from proxy import modellist
from proxy.providers.base import Outbound, Provider, looks_like_invalid_key, parse_error_message
from proxy.providers.openai import OpenAIProvider
from proxy.recorder import Entry, recorder
from proxy.runtime import now, runtime
from proxy.snapshot import GroupView, KeyEntry, Snapshot
from proxy.usage import UsageTap

log = logging.getLogger("gptload.proxy")
DEFAULT_COOLDOWN = 60.0
THROTTLE_WINDOW = 10.0  # seconds in which 429s from most of a pool mean the caller is throttled
THROTTLE_MIN_KEYS = 3
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "host", "content-length"})  # fmt: skip
READABLE_ENCODINGS = ("gzip", "deflate", "identity")
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
DURATION_SCALE = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
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


class Limiter:
    """`MAX_CONCURRENT_REQUESTS`: proxied requests in flight, streams included."""

    def __init__(self) -> None:
        self.inflight = 0

    def enter(self) -> None:
        if self.inflight >= settings.MAX_CONCURRENT_REQUESTS:
            raise ProxyError(
                429,
                "Too many concurrent requests through this gateway; retry shortly.",
                "rate_limit_exceeded",
                retry_after=1,
            )
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1


limiter = Limiter()


@dataclass
class Target:
    """The call as prepared for one standard group (its redirects and overrides applied)."""

    group: GroupView
    path: str
    body: bytes
    model: str
    stream: bool
    strip_usage: bool


@dataclass
class Call:
    """One client request as it moves through the pipeline."""

    entry: GroupView  # the group named in the URL, perhaps an aggregate
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    json: dict[str, Any] | None
    started: float
    client_ip: str
    request_path: str
    user_agent: str
    tried: set[int] = field(default_factory=set)
    members_tried: set[int] = field(default_factory=set)
    targets: dict[int, Target] = field(default_factory=dict)

    def target(self, group: GroupView) -> Target:
        if group.id not in self.targets:
            try:
                self.targets[group.id] = prepare(self, group)
            except ProxyError as refusal:
                self.record(self.unprepared(group), None, refusal.status, final=True,
                            error=refusal.message)  # fmt: skip
                raise
        return self.targets[group.id]

    def unprepared(self, group: GroupView) -> Target:
        """The call as the client sent it, to log a refusal made before any attempt."""
        prepared = next(iter(self.targets.values()), None)
        if prepared is not None:
            return prepared
        model = group.provider.model_of(self.path, self.json)
        return Target(group, self.path, self.body, model, False, False)

    def elapsed_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)

    def record(self, target: Target, key: KeyEntry | None, status: int, *, final: bool,
               error: str = "", upstream: str = "", usage: Any = None) -> None:  # fmt: skip
        group = target.group
        parent = self.entry if self.entry is not group else None
        entry = Entry(
            timestamp=time.time(), group_id=group.id, group_name=group.name,
            parent_group_id=parent.id if parent else None,
            parent_group_name=parent.name if parent else "",
            key_id=key.id if key else None, key_stored=key.stored if key else "",
            key_hash=key.hash if key else "", model=target.model, status=status,
            error=error, final=final, duration_ms=self.elapsed_ms(), source_ip=self.client_ip,
            request_path=self.request_path, upstream=upstream, stream=target.stream, usage=usage,
        )  # fmt: skip
        if group.settings["enable_request_body_logging"]:
            entry.user_agent = self.user_agent
            entry.request_body = target.body.decode(errors="replace")
        recorder.record(entry)


async def proxy(request: HttpRequest, group_name: str, path: str) -> HttpResponseBase:
    started = time.perf_counter()
    snapshot = await runtime.current()
    recorder.configure(snapshot.system["request_log_write_interval_minutes"])
    group = snapshot.groups.get(group_name)
    provider = group.provider if group else DEFAULT_PROVIDER
    response: HttpResponseBase
    streaming = False
    try:
        limiter.enter()
    except ProxyError as error:
        return stamp(error.response(provider), started)
    try:
        call = start_call(request, authorize(request, snapshot, group, group_name), path, started)
        response = await forward(call)
        streaming = response.streaming
    except ProxyError as error:
        response = error.response(provider)
    except Exception:  # a bug of ours must still answer in the caller's format
        log.exception("proxy request to group %r failed", group_name)
        failure = ProxyError(500, "gptload failed to handle this request.", "internal_error")
        response = failure.response(provider)
    finally:
        if not streaming:
            limiter.leave()
    return stamp(response, started)


def stamp(response: HttpResponseBase, started: float) -> HttpResponseBase:
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
    return group


def start_call(request: HttpRequest, group: GroupView, path: str, started: float) -> Call:
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
    if "accept-encoding" in headers:  # only what gptload can read usage from
        headers["accept-encoding"] = readable_encodings(headers["accept-encoding"])
    body = request.body
    data: dict[str, Any] | None = None
    if body[:1] == b"{":
        try:
            parsed = orjson.loads(body)
            data = parsed if isinstance(parsed, dict) else None
        except orjson.JSONDecodeError:
            data = None
    path = "/" + path.lstrip("/")
    shown_query = ("?" + urlencode(query)) if query else ""
    return Call(
        entry=group, method=request.method or "GET", path=path, query=query, headers=headers,
        body=body, json=data, started=started, client_ip=client_ip(request),
        request_path=f"/proxy/{group.name}{path}{shown_query}",
        user_agent=request.headers.get("User-Agent", ""),
    )  # fmt: skip


def prepare(call: Call, group: GroupView) -> Target:
    provider = group.provider
    path, body = call.path, call.body
    data = dict(call.json) if call.json is not None else None
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
            model, changed = target, data is not None
    if data is not None and group.param_overrides:
        data.update(group.param_overrides)
        changed = True
    stream = provider.is_stream(path, call.query, call.headers.get("accept", ""), data)
    strip = False
    if stream and data is not None and provider.wants_usage_injection(path):
        options = data.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            data["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                      "include_usage": True}  # fmt: skip
            strip = changed = True
    if changed and data is not None:
        body = orjson.dumps(data)
    return Target(group, path, body, model, stream, strip)


def choose(call: Call, at: float) -> tuple[Target, KeyEntry] | None:
    """The next key to try (and, for an aggregate, the member it belongs to)."""
    entry = call.entry
    if not entry.is_aggregate:
        if entry.backoff_until > at:
            return None
        key = entry.ring.pick(at, call.tried)
        return (call.target(entry), key) if key else None

    def untried(member: GroupView) -> bool:
        return member.id not in call.members_tried and usable(member)

    def usable(member: GroupView) -> bool:
        return member.enabled and member.backoff_until <= at and member.ring.has_usable(at)

    member = entry.members.pick(untried) or entry.members.pick(usable)
    if member is None:
        return None
    key = member.ring.pick(at, call.tried)
    if key is None:
        return None
    call.members_tried.add(member.id)
    return call.target(member), key


@dataclass
class Failed:
    """An attempt that failed over: logged as a retry if another follows, else final."""

    target: Target
    key: KeyEntry
    response: HttpResponse
    url: str
    error: str

    def record(self, call: Call, final: bool) -> None:
        call.record(self.target, self.key, self.response.status_code, final=final,
                    error=self.error, upstream=self.url)  # fmt: skip


async def forward(call: Call) -> HttpResponseBase:
    last: Failed | None = None
    for _ in range(int(call.entry.settings["max_retries"]) + 1):
        chosen = choose(call, now())
        if chosen is None:
            break
        if last is not None:
            last.record(call, final=False)
        target, key = chosen
        group = target.group
        call.tried.add(key.id)
        upstream = group.upstreams.pick()
        url = upstream + target.path
        try:
            response = await send(call, target, key, upstream)
        except httpx.TransportError as exc:
            error = f"{type(exc).__name__}: {mask_in(str(exc), key.secret)}"
            note_failure(group, key, error)
            body = group.provider.error_body(
                502, f"Upstream unreachable: {error}", "upstream_error"
            )
            last = Failed(target, key, HttpResponse(body, status=502, content_type="application/json"),
                          url, error)  # fmt: skip
            continue
        except asyncio.CancelledError:
            call.record(target, key, 499, final=True, error="client disconnected", upstream=url)
            raise
        status = response.status_code
        rejected = status == 400 and status not in group.failover_codes
        if status in group.failover_codes or rejected:
            try:
                body = await response.aread()
            finally:
                await response.aclose()
            if rejected and not looks_like_invalid_key(parse_error_message(body)):
                # The client's mistake (Gemini says "bad key" with 400 too: that one retries).
                call.record(target, key, status, final=True, error=parse_error_message(body),
                            upstream=url)  # fmt: skip
                return buffered(response, body)
            error = judge_failure(group, key, status, response.headers, body)
            content_type = response.headers.get("content-type", "application/json")
            failed = HttpResponse(mask_in(body, key.secret.encode()), status=status,
                                  content_type=content_type)  # fmt: skip
            last = Failed(target, key, failed, url, error)
            continue
        if status < 400:
            note_success(key)
        if modellist.is_model_list(call.method, target.path) and (group.redirects or group.strict):
            return await model_list(call, target, key, response, url)
        if target.stream or "text/event-stream" in response.headers.get("content-type", ""):
            return relay(call, target, key, response, url)
        return await answer(call, target, key, response, url)
    if last is not None:
        last.record(call, final=True)
        return last.response
    raise no_key_error(call)


def buffered(upstream: httpx.Response, body: bytes) -> HttpResponse:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
    return HttpResponse(body, status=upstream.status_code, headers=headers)


def no_key_error(call: Call) -> ProxyError:
    """Nothing to try: the pool is throttled as a whole (429) or has no usable key (503)."""
    at = now()
    groups = [m for m, _ in call.entry.members.items] if call.entry.is_aggregate else [call.entry]
    backoff = [g.backoff_until - at for g in groups if g.backoff_until > at]
    if backoff and len(backoff) == len(groups):
        error = ProxyError(
            429,
            "The upstream is rate limiting this group's whole key pool; retry later.",
            "rate_limit_exceeded",
            min(backoff),
        )
    else:
        waits = [w for g in groups if (w := g.ring.next_ready_in(at)) is not None]
        error = ProxyError(
            503,
            "No usable upstream key in this group right now.",
            "no_keys_available",
            min(waits) if waits else DEFAULT_COOLDOWN,
        )
    target = call.unprepared(call.entry) if call.entry.is_aggregate else call.target(call.entry)
    call.record(target, None, error.status, final=True, error=error.message)
    return error


async def send(call: Call, target: Target, key: KeyEntry, upstream: str) -> httpx.Response:
    group = target.group
    outbound = Outbound(target.path, list(call.query), dict(call.headers))
    group.provider.inject_key(outbound, key.secret)
    if target.strip_usage:
        outbound.headers["accept-encoding"] = "identity"
    apply_header_rules(outbound, group, key, call.client_ip)
    url = upstream + outbound.path + ("?" + urlencode(outbound.query) if outbound.query else "")
    settings = group.settings
    timeout = httpx.Timeout(
        connect=settings["connect_timeout"],
        read=settings["response_header_timeout"] if target.stream else settings["request_timeout"],
        write=settings["request_timeout"],
        pool=settings["connect_timeout"],
    )
    http = runtime.http(settings)
    request = http.build_request(
        call.method, url, headers=outbound.headers, content=target.body or None, timeout=timeout
    )
    return await http.send(request, stream=True)


def apply_header_rules(outbound: Outbound, group: GroupView, key: KeyEntry, client: str) -> None:
    if not group.header_rules:
        return
    stamp_s = time.time()
    variables = {"${CLIENT_IP}": client, "${GROUP_NAME}": group.name, "${API_KEY}": key.secret,
                 "${TIMESTAMP_MS}": str(int(stamp_s * 1000)), "${TIMESTAMP_S}": str(int(stamp_s))}  # fmt: skip
    for rule in group.header_rules:
        name = rule["key"].lower()
        if rule.get("action", "set") == "remove":
            outbound.headers.pop(name, None)
            continue
        value = rule.get("value", "")
        for var, replacement in variables.items():
            value = value.replace(var, replacement)
        outbound.headers[name] = value


async def answer(
    call: Call, target: Target, key: KeyEntry, upstream: httpx.Response, url: str
) -> HttpResponseBase:
    """A plain (non-stream) answer: read whole, then sent with its length in one piece.

    Cheaper than relaying it chunk by chunk, and the client loses nothing: it could not
    use a JSON body before its last byte anyway.
    """
    try:
        body = await upstream.aread()
    except httpx.HTTPError as exc:  # the upstream broke off mid-body
        error = f"upstream broke off: {type(exc).__name__}: {mask_in(str(exc), key.secret)}"
        note_failure(target.group, key, error)
        call.record(target, key, 502, final=True, error=error, upstream=url)
        raise ProxyError(502, error, "upstream_error") from None
    except asyncio.CancelledError:
        call.record(target, key, 499, final=True, error="client disconnected", upstream=url)
        raise
    finally:
        await upstream.aclose()
    tap = UsageTap(target.group.provider, False, upstream.headers.get("content-encoding", ""),
                   strip=False)  # fmt: skip
    tap.feed(body)
    tap.finish()
    error = parse_error_message(body) if upstream.status_code >= 400 else ""
    call.record(target, key, upstream.status_code, final=True, error=error, upstream=url,
                usage=tap.usage)  # fmt: skip
    response = buffered(upstream, body)
    response["content-length"] = str(len(body))
    return response


def relay(
    call: Call, target: Target, key: KeyEntry, upstream: httpx.Response, url: str
) -> StreamingHttpResponse:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
    if target.stream:
        headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
    elif "content-length" in upstream.headers and not target.strip_usage:
        headers["content-length"] = upstream.headers["content-length"]
    body = Relay(call, target, key, upstream, url)
    response = StreamingHttpResponse(body, status=upstream.status_code, headers=headers)
    response.relay = body  # type: ignore[attr-defined]
    return response


class Relay:
    """The upstream body on its way to the client; the attempt is recorded when it ends.

    `aclose()` (called by the proxy's ASGI handler after every response) finishes a
    relay whose body never started, as when the client left before the first byte.
    """

    def __init__(
        self, call: Call, target: Target, key: KeyEntry, upstream: httpx.Response, url: str
    ) -> None:
        self.call, self.target, self.key, self.upstream, self.url = call, target, key, upstream, url
        sse = "text/event-stream" in upstream.headers.get("content-type", "")
        encoding = upstream.headers.get("content-encoding", "")
        self.tap = UsageTap(target.group.provider, sse, encoding, strip=target.strip_usage)
        self.finished = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        status, error = self.upstream.status_code, ""
        try:
            async for chunk in self.upstream.aiter_raw():
                if out := self.tap.feed(chunk):
                    yield out
            if rest := self.tap.finish():
                yield rest
        except httpx.HTTPError as exc:  # the upstream broke off mid-body
            error = (
                f"upstream broke off: {type(exc).__name__}: {mask_in(str(exc), self.key.secret)}"
            )
            note_failure(self.target.group, self.key, error)
        except (GeneratorExit, asyncio.CancelledError):
            status, error = 499, "client disconnected"
            raise
        finally:
            await self.finish(status, error)

    async def finish(self, status: int, error: str) -> None:
        if self.finished:
            return
        self.finished = True
        limiter.leave()
        await self.upstream.aclose()
        tap = self.tap
        if status >= 400 and not error:
            error = parse_error_message(b"".join(tap.parts or [tap.pending]))
        self.call.record(self.target, self.key, status, final=True, error=error,
                         upstream=self.url, usage=tap.usage)  # fmt: skip

    async def aclose(self) -> None:
        await self.finish(499, "client disconnected")


async def model_list(
    call: Call, target: Target, key: KeyEntry, upstream: httpx.Response, url: str
) -> HttpResponseBase:
    """Buffers the upstream's model list and answers it with the group's rules applied."""
    try:
        body = await upstream.aread()
    finally:
        await upstream.aclose()
    group = target.group
    encoded = upstream.headers.get("content-encoding", "identity")
    rewritten = None
    if upstream.status_code < 400 and encoded in ("", "identity"):
        first_page = not any(k == "pageToken" for k, _ in call.query)
        rewritten = modellist.rewrite(body, list(group.redirects), group.strict, first_page)
    call.record(target, key, upstream.status_code, final=True, upstream=url)
    if rewritten is None:
        return buffered(upstream, body)
    return HttpResponse(rewritten, status=200, content_type="application/json")


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
) -> str:
    """Decides what a failed attempt means for its key; returns the error as logged."""
    message = mask_in(parse_error_message(body), key.secret)
    error = f"[status {status}] {message}"
    if status in (401, 403) or looks_like_invalid_key(message):
        bench(group, key)
        runtime.key_changed(key, error)
    elif status == 429:
        throttle(group, key, cooldown_of(headers), error)
    elif status >= 500 or status == 408:
        note_failure(group, key, error)
    return message


def throttle(group: GroupView, key: KeyEntry, cooldown: float, error: str) -> None:
    """429: cools the key, unless most of the pool said 429 at once; then the group rests."""
    at = now()
    recent = [(t, k) for t, k in group.recent_429 if t > at - THROTTLE_WINDOW] + [(at, key)]
    group.recent_429 = recent
    hit = {k for _, k in recent}
    if len(hit) >= THROTTLE_MIN_KEYS and 2 * len(hit) >= len(group.ring.keys):
        group.backoff_until = max(group.backoff_until, at + cooldown)
        group.recent_429 = []
        log.warning("group %s: %d keys rate limited at once; backing off %.0f s",
                    group.name, len(hit), cooldown)  # fmt: skip
        for benched in hit:  # the caller is throttled, not each key: they stay in rotation
            benched.status, benched.cooling_until = KeyStatus.ACTIVE, 0.0
            runtime.key_changed(benched, error if benched is key else "")
        return
    key.status, key.cooling_until = KeyStatus.COOLING, at + cooldown
    runtime.key_changed(key, error)


def bench(group: GroupView, key: KeyEntry) -> None:
    key.status = KeyStatus.INVALID
    group.ring.remove(key)


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
    if not text:
        return None
    try:
        return max(1.0, float(text))
    except ValueError:
        pass
    parts = DURATION_PART.findall(text)
    if not parts:
        return None
    return max(1.0, sum(float(n) * DURATION_SCALE[u] for n, u in parts))


def mask_in(text: AnyStr, secret: AnyStr) -> AnyStr:
    """`text` with every copy of the upstream key replaced by its masked form."""
    if not secret or secret not in text:
        return text
    masked = mask(secret if isinstance(secret, str) else secret.decode())
    return text.replace(secret, masked if isinstance(text, str) else masked.encode())


def readable_encodings(accept: str) -> str:
    """The client's Accept-Encoding without the codings gptload cannot read usage from."""
    kept = [p.strip() for p in accept.split(",") if p.split(";")[0].strip() in READABLE_ENCODINGS]
    return ", ".join(kept) or "identity"


def client_ip(request: HttpRequest) -> str:
    forwarded = request.headers.get("X-Forwarded-For", "")
    if forwarded:
        return forwarded.split(",")[0].strip()
    return request.headers.get("X-Real-Ip") or request.META.get("REMOTE_ADDR") or ""
