"""The proxied request, top to bottom: resolve group → authenticate → choose key and
upstream → build the upstream request → send → answer or stream back → end the attempt
(its key's state and its log row, in one place: `Attempt.end`).

Upstream bytes pass through as they come: never decoded on their way (a decoded copy is
read for token usage), so the client gets exactly the body its headers describe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NoReturn
from urllib.parse import parse_qsl, quote, urlencode

import aiohttp
import orjson
from django.conf import settings
from django.http import HttpRequest
from django.http.cookie import SimpleCookie
from django.http.response import HttpResponseBase, ResponseHeaders
from multidict import CIMultiDictProxy
from yarl import URL

from access.models import AccessRule
from gptload.lib.providers.base import Outbound, Provider, Usage, parse_error_message
from gptload.lib.providers.headers import (
    CLIENT_CREDENTIALS,
    HOP_BY_HOP,
    SERVER_OWNED,
    connection_tokens,
)
from gptload.lib.providers.openai import OpenAIProvider
from gptload.lib.secrets import mask_in
from keys.caps import RECHECK, Admission, caps
from keys.states import (
    DEFAULT_COOLDOWN,
    KeyEntry,
    Verdict,
    announced_rest,
    classify,
    cooldown_of,
    key_states,
    wait_for_key,
)
from logs.writer import LogEntry
from proxy import metrics, modellist
from proxy.limits import Refusal, Ticket, limits, reservation
from proxy.recorder import recorder
from proxy.runtime import runtime
from proxy.snapshot import GroupView, Snapshot, digest
from proxy.usage import UsageTap, decode_whole

log = logging.getLogger("gptload.proxy")
DEFAULT_PROVIDER = OpenAIProvider()
UNREACHABLE = (aiohttp.ClientError, TimeoutError, OSError)
# Never sent on to the client: the connection's own, and what the answering server sets.
NOT_RELAYED = HOP_BY_HOP | SERVER_OWNED
NOT_RELAYED_RAW = frozenset(name.encode() for name in NOT_RELAYED)
# Request headers not forwarded as they are (ASGI servers give names in lower case).
CLIENT_CREDENTIALS_RAW = frozenset(name.encode() for name in CLIENT_CREDENTIALS)
SKIPPED_RAW = CLIENT_CREDENTIALS_RAW | frozenset(name.encode() for name in HOP_BY_HOP)
STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
STREAM_HEADER_NAMES = frozenset(name for name, _ in STREAM_HEADERS)
PATH_SAFE = "/:@!$&'()*+,;=~"
WAKE_MARGIN = 0.002  # seconds past a key's return, so that the wait ends after it


class ProxyError(Exception):
    """gptload's own refusal, answered in the caller's provider shape."""

    def __init__(
        self, status: int, message: str, kind: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.retry_after = status, message, kind, retry_after

    def response(self, provider: Provider) -> ProxyResponse:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(max(1, round(self.retry_after))).encode()))
        return ProxyResponse(self.status, headers, provider.error_body(self.status, self.message,
                                                                       self.kind))  # fmt: skip


class ProxyResponse(HttpResponseBase):
    """An answer that the proxy's ASGI handler sends as it is: raw header pairs (plus any
    a middleware set in `headers`), and the body whole (with its length) or as chunks
    from a `Relay`.

    Made without `HttpResponseBase.__init__`, whose header mapping and cookie jar cost
    more than the rest of a proxied call's own work: both are made only if asked for.
    """

    streaming = False
    status_code = 200
    _reason_phrase = None
    _charset = None
    _handler_class = None
    closed = False

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        relay: Relay | None = None,
    ) -> None:
        self.status_code = status
        self._resource_closers: list[Any] = []
        if relay is None:
            headers.append((b"content-length", str(len(body)).encode()))
        else:
            self.streaming = True
        self.raw_headers = headers
        self.body = body
        self.relay = relay

    @cached_property
    def headers(self) -> ResponseHeaders:  # type: ignore[override]
        return ResponseHeaders({})

    @cached_property
    def cookies(self) -> SimpleCookie:  # type: ignore[override]
        return SimpleCookie()

    @property
    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        """What a middleware set, as raw pairs (nothing, unless CORS is on)."""
        added = self.__dict__.get("headers")
        if not added:
            return []
        return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in added.items()]


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


# The request ---------------------------------------------------------------------------------


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

    method: str
    path: str  # percent-encoded, as sent
    query: list[tuple[str, str]]
    headers: dict[str, str]  # what goes upstream: lower-case names, no credential
    credential: str
    body: bytes
    json: dict[str, Any] | None
    started: float
    client_ip: str
    user_agent: str
    entry: GroupView | None = None  # the group named in the URL, perhaps an aggregate
    access: AccessRule | None = None  # the access key it came with (not a proxy key)
    ticket: Ticket | None = None  # its place in the access key's limits, until settled
    waited: float = 0.0  # seconds spent waiting on upstreams
    tried: set[int] = field(default_factory=set)
    members_tried: set[int] = field(default_factory=set)
    targets: dict[int, Target] = field(default_factory=dict)
    held: LogEntry | None = None  # a failed attempt's row, until we know if it was the last
    refreshed: bool = False  # the snapshot was checked for new keys once
    key_waited: float = 0.0  # seconds spent waiting for a key to come back

    @property
    def request_path(self) -> str:
        name = self.entry.name if self.entry else "?"
        shown = ("?" + urlencode(self.query)) if self.query else ""
        return f"/proxy/{name}{self.path}{shown}"

    def target(self, group: GroupView) -> Target:
        if group.id not in self.targets:
            try:
                self.targets[group.id] = prepare(self, group)
            except ProxyError as refusal:
                Attempt(self, self.unprepared(group), None, "").end(
                    refusal.status, error=refusal.message
                )
                raise
        return self.targets[group.id]

    def unprepared(self, group: GroupView) -> Target:
        """The call as the client sent it, to log a refusal made before any attempt."""
        prepared = next(iter(self.targets.values()), None)
        if prepared is not None:
            return prepared
        model = group.provider.model_of(self.path, self.json)
        return Target(group, self.path, self.body, model, False, False)

    def settle(self, final: bool) -> None:
        """Logs the held row of a failed attempt: a retry if another attempt follows."""
        if self.held is not None:
            self.held.final = final
            recorder.record(self.held)
            if final:
                self.measure(self.held)
            else:
                metrics.tally.retried(self.entry.name if self.entry else self.held.group_name)
            self.held = None

    def measure(self, entry: LogEntry) -> None:
        """Counts the request's end in the metrics, by the group named in its URL, and in
        its access key's limits (the tokens it used, instead of those it reserved)."""
        if self.ticket is not None:
            usage = entry.usage.total_tokens if entry.usage else None
            self.release(usage if usage is not None or entry.success else 0)
        group = self.entry
        name, channel = (group.name, group.channel) if group else (entry.group_name, "")
        metrics.tally.ended(name, channel, entry, time.perf_counter() - self.started)

    def release(self, used: int | None = None) -> None:
        """Settles the access key's ticket, once (`used` None: its reservation stands)."""
        if self.ticket is not None:
            limits.settle(self.ticket, used)

    def overhead_ms(self) -> float:
        return max(0.0, (time.perf_counter() - self.started - self.waited) * 1000)


def start_call(request: HttpRequest, path: str, started: float) -> Call:
    scope = request.scope  # type: ignore[attr-defined]
    headers: dict[str, str] = {}
    credential = ""
    bearer = ""
    drop: set[str] = set()
    for raw_name, raw_value in scope["headers"]:
        raw_name = raw_name.lower()  # ASGI servers send them so; a credential must never slip
        if raw_name in SKIPPED_RAW:
            if raw_name == b"authorization":
                bearer = (
                    raw_value[7:].strip().decode("latin-1")
                    if raw_value[:7].lower() == b"bearer "
                    else ""
                )
            elif raw_name in CLIENT_CREDENTIALS_RAW:
                credential = credential or raw_value.decode("latin-1")
            elif raw_name == b"connection":
                drop |= connection_tokens(raw_value.decode("latin-1"))
            continue
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    for name in drop:
        headers.pop(name, None)
    query_string = scope.get("query_string", b"").decode("latin-1")
    query = parse_qsl(query_string, keep_blank_values=True) if query_string else []
    query_key = next((v for k, v in query if k == "key"), "")
    if query_key:
        query = [(k, v) for k, v in query if k != "key"]
    body = request.body
    data: dict[str, Any] | None = None
    if body[:1] == b"{":
        try:
            parsed = orjson.loads(body)
            data = parsed if isinstance(parsed, dict) else None
        except orjson.JSONDecodeError:
            data = None
    return Call(
        method=request.method or "GET", path=raw_path(scope, path), query=query, headers=headers,
        credential=query_key or bearer or credential, body=body, json=data, started=started,
        client_ip=client_ip(headers, scope), user_agent=headers.get("user-agent", ""),
    )  # fmt: skip


def raw_path(scope: dict[str, Any], path: str) -> str:
    """The path after `/proxy/{group}` as the client encoded it (an encoded `?` or `/`
    stays encoded); dot segments are refused rather than resolved."""
    raw = scope.get("raw_path")
    if raw:
        parts = raw.split(b"?", 1)[0].split(b"/", 3)
        encoded = "/" + (parts[3].decode("latin-1") if len(parts) > 3 else "")
    else:
        encoded = "/" + quote(path.lstrip("/"), safe=PATH_SAFE)
    if "%" in encoded and ("%3f" in (lowered := encoded.lower()) or "%23" in lowered):
        # Decoded anywhere on the way (a proxy in front, an upstream's router) it would
        # start a query or a fragment the client's URL did not have.
        raise ProxyError(400, "The path may not contain an encoded '?' or '#'.",
                         "invalid_request_error")  # fmt: skip
    if "/." in encoded or "%2e" in encoded.lower():
        segments = [quote_free(s) for s in encoded.split("/")]
        if "." in segments or ".." in segments:
            raise ProxyError(400, "The path may not contain '.' or '..' segments.",
                             "invalid_request_error")  # fmt: skip
    return encoded


def quote_free(segment: str) -> str:
    from urllib.parse import unquote

    return unquote(segment)


def client_ip(headers: dict[str, str], scope: dict[str, Any]) -> str:
    """The peer's address. The server has already replaced it with X-Forwarded-For's when
    the peer is a trusted proxy (FORWARDED_ALLOW_IPS); anyone else's header is not read,
    so that the address logged and sent as ${CLIENT_IP} cannot be forged."""
    client = scope.get("client")
    return str(client[0]) if client else ""


async def proxy(request: HttpRequest, group_name: str, path: str) -> HttpResponseBase:
    started = time.perf_counter()
    snapshot = runtime.snapshot or await runtime.current()
    recorder.configure(snapshot.system["request_log_write_interval_minutes"])
    group = snapshot.groups.get(group_name)
    provider = group.provider if group else DEFAULT_PROVIDER
    refusal: ProxyError | None = getattr(request, "refusal", None)  # made by the handler
    if refusal is not None:
        metrics.tally.refused(refusal.status)
        return refusal.response(provider)
    response: ProxyResponse
    try:
        limiter.enter()
    except ProxyError as error:
        return error.response(provider)
    call = None
    relaying = False
    try:
        call = start_call(request, path, started)
        admitted: Opened | None = getattr(request, "admitted", None)  # by the handler
        call.entry, call.access = admitted or await authorize(call.credential, snapshot, group_name)
        response = await forward(call)
    except ProxyError as error:
        response = error.response(call.entry.provider if call and call.entry else provider)
    except Exception:  # a bug of ours must still answer in the caller's format
        log.exception("proxy request to group %r failed", group_name)
        failure = ProxyError(500, "gptload failed to handle this request.", "internal_error")
        response = failure.response(provider)
    else:
        relaying = response.relay is not None  # the relay gives the slot back when it ends
    finally:
        if not relaying:
            limiter.leave()
            if call is not None:
                call.release()  # a call that ended without a final row (a bug of ours)
    overhead = call.overhead_ms() if call else (time.perf_counter() - started) * 1000
    response.raw_headers.append((b"x-gptload-overhead-ms", f"{overhead:.2f}".encode()))
    metrics.tally.spent(overhead / 1000)
    if call is None or call.entry is None:  # refused before a group: no attempt counted it
        metrics.tally.refused(response.status_code)
    return response


def credential_of(scope: dict[str, Any]) -> str:
    """The client's key as `start_call` reads it (`?key=`, else Bearer, else `x-api-key` or
    `x-goog-api-key`), from the request line and headers alone."""
    query_string = scope.get("query_string", b"")
    if b"key=" in query_string:
        for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
            if name == "key":
                if value:
                    return value
                break
    bearer = credential = ""
    for raw_name, raw_value in scope["headers"]:
        raw_name = raw_name.lower()
        if raw_name == b"authorization":
            if raw_value[:7].lower() == b"bearer ":
                bearer = raw_value[7:].strip().decode("latin-1")
        elif raw_name in CLIENT_CREDENTIALS_RAW and not credential:
            credential = raw_value.decode("latin-1")
    return bearer or credential


# The group a call may use, and the access key it came with (None: a proxy key).
Opened = tuple[GroupView, AccessRule | None]


async def admit(scope: dict[str, Any], name: str) -> Opened:
    """The group a request may use (and its access key, if it came with one), judged from
    its request line and headers before its body is read (a stranger's body is never
    buffered); raises the refusal."""
    snapshot = runtime.snapshot or await runtime.current()
    return await authorize(credential_of(scope), snapshot, name)


async def authorize(credential: str, snapshot: Snapshot, name: str) -> Opened:
    """The group named in the URL, if the call's key opens it: a proxy key (the group's or
    a global one) or an access key. A miss (no such group, a key not known) looks at the
    configuration version once: it may have just changed."""
    if not credential:
        raise ProxyError(
            401,
            "Missing proxy key: send it as Authorization: Bearer, x-api-key, x-goog-api-key or ?key=.",
            "authentication_error",
        )
    secret = digest(credential)
    group = snapshot.groups.get(name)
    access = snapshot.access.get(secret)
    if group is None or not (
        access or secret in group.proxy_keys or secret in snapshot.global_keys
    ):
        snapshot = await runtime.refresh()
        group = snapshot.groups.get(name)
        access = snapshot.access.get(secret)
    if access is not None:
        return opened_by(access, group, name), access
    if group is None:
        if secret not in snapshot.global_keys:  # whether a group exists is no stranger's business
            raise ProxyError(401, "Invalid proxy key.", "authentication_error")
        raise ProxyError(404, f"No group named {name!r}.", "not_found_error")
    if not (secret in group.proxy_keys or secret in snapshot.global_keys):
        raise ProxyError(401, "Invalid proxy key.", "authentication_error")
    if not group.enabled:
        raise ProxyError(403, f"Group {name!r} is disabled.", "permission_error")
    return group, None


def opened_by(access: AccessRule, group: GroupView | None, name: str) -> GroupView:
    """The group an access key opens, or the refusal: 401 for a key that has expired (a
    disabled one is not in the snapshot: unknown), 403 for a group it may not use."""
    if access.expired(time.time()):
        raise ProxyError(401, "This access key has expired.", "authentication_error")
    if group is None:
        raise ProxyError(404, f"No group named {name!r}.", "not_found_error")
    if not access.allows_group(group.id):
        raise ProxyError(403, f"This access key may not use group {name!r}.", "permission_error")
    if not group.enabled:
        raise ProxyError(403, f"Group {name!r} is disabled.", "permission_error")
    return group


async def check_access(call: Call, access: AccessRule) -> None:
    """The access key's model rule and limits, before the first attempt: 403 for a model
    it may not use, 429 with `Retry-After` for a limit reached (each logged as the call's
    final row). A call let through holds a ticket until it ends (`Call.measure`)."""
    entry = call.entry
    assert entry is not None  # noqa: S101 - set by authorize()
    if access.models:
        model = entry.provider.model_of(call.path, call.json)
        if model and not access.allows_model(model):
            refuse(call, ProxyError(403, f"This access key may not use model {model!r}.",
                                    "permission_error"))  # fmt: skip
    if access.limited:
        reserve = reservation(call.json, len(call.body)) if access.counts_tokens else 0
        taken = await limits.take(access, reserve)
        if isinstance(taken, Refusal):
            refuse(call, ProxyError(429, taken.message, "rate_limit_exceeded",
                                    retry_after=taken.retry_after))  # fmt: skip
        call.ticket = taken


def refuse(call: Call, refusal: ProxyError) -> NoReturn:
    """Logs a refusal of the whole call as its final row, then raises it."""
    assert call.entry is not None  # noqa: S101 - set by authorize()
    Attempt(call, call.unprepared(call.entry), None, "").end(refusal.status, error=refusal.message)
    raise refusal


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


# Attempts ------------------------------------------------------------------------------------


class Attempt:
    """One try of a call on one key; `end()` is the only place its outcome goes."""

    def __init__(self, call: Call, target: Target, key: KeyEntry | None, url: str) -> None:
        self.call, self.target, self.key, self.url = call, target, key, url
        self.failure: ProxyResponse | None = None  # the answer if no other attempt follows
        self.admission: Admission | None = None  # counted against the key's caps

    def release(self) -> None:
        """Gives back the key's concurrency slot, if the attempt took one (once); the key
        comes back into rotation if it was held only for want of a slot."""
        admission, key = self.admission, self.key
        if admission is None or key is None or admission.released:
            return
        caps.release(key.id, admission)
        if admission.slot:
            now = time.time()
            if key.held_until <= now + RECHECK:  # not held for a full minute or day
                self.target.group.pool.unhold(key, now)

    def end(
        self,
        status: int,
        *,
        verdict: Verdict | None = None,
        error: str = "",
        usage: Usage | None = None,
        cooldown: float = DEFAULT_COOLDOWN,
        blameless: bool = False,
        failover: bool = False,
        unanswered: bool = False,
    ) -> None:
        """Applies `verdict` to the key (None: it says nothing about the key), then logs
        the attempt; a `failover` row waits for `Call.settle` (retry or final).
        `unanswered`: the upstream gave no status of its own (a network error)."""
        self.release()
        group, key = self.target.group, self.key
        if key is not None and verdict is not None:
            if verdict is Verdict.OK:
                key_states.succeeded(key)
            else:
                reason = error if unanswered else f"[status {status}] {error}".strip()
                key_states.failed(group.pool, key, verdict, reason, threshold=group.threshold,
                                  cooldown=cooldown)  # fmt: skip
        call = self.call
        parent = call.entry if call.entry is not group else None
        entry = LogEntry(
            timestamp=time.time(), group_id=group.id, group_name=group.name,
            parent_group_id=parent.id if parent else None,
            parent_group_name=parent.name if parent else "",
            key_id=key.id if key else None, key_stored=key.stored if key else "",
            key_hash=key.hash if key else "", model=self.target.model, status=status,
            error=error, final=not failover,
            duration_ms=int((time.perf_counter() - call.started) * 1000),
            source_ip=call.client_ip, request_path=call.request_path, upstream=self.url,
            stream=self.target.stream, usage=usage, blameless=blameless,
            access_key_id=call.access.id if call.access else None,
        )  # fmt: skip
        if group.log_bodies:
            entry.user_agent = call.user_agent
            entry.request_body = self.target.body.decode(errors="replace")
        if failover:
            call.held = entry
        else:
            recorder.record(entry)
            call.measure(entry)


def choose(call: Call, at: float) -> tuple[Target, KeyEntry] | None:
    """The next key to try (and, for an aggregate, the member it belongs to)."""
    entry = call.entry
    assert entry is not None  # noqa: S101 - set by authorize()
    if not entry.is_aggregate:
        if entry.pool.backoff_until > at:
            return None
        key = entry.pool.pick(at, call.tried)
        return (call.target(entry), key) if key else None

    def untried(member: GroupView) -> bool:
        return member.id not in call.members_tried and usable(member)

    def usable(member: GroupView) -> bool:
        return member.enabled and member.pool.backoff_until <= at and member.pool.has_usable(at)

    member = entry.members.pick(untried) or entry.members.pick(usable)
    if member is None:
        return None
    key = member.pool.pick(at, call.tried)
    if key is None:
        return None
    call.members_tried.add(member.id)
    return call.target(member), key


async def forward(call: Call) -> ProxyResponse:
    entry = call.entry
    assert entry is not None  # noqa: S101 - set by authorize()
    if call.access is not None:
        await check_access(call, call.access)
    failed: ProxyResponse | None = None
    for _ in range(entry.attempts):
        chosen = await next_key(call, failed is not None)
        if chosen is None:
            break
        call.settle(final=False)
        target, key, admission = chosen
        call.tried.add(key.id)
        base = target.group.upstreams.pick()
        attempt = Attempt(call, target, key, base + target.path)
        attempt.admission = admission
        try:
            answer = await try_once(attempt, base)
        except BaseException:
            attempt.release()  # however the attempt ended, its slot is given back
            raise
        if answer is not None:
            return answer
        failed = attempt.failure
    call.settle(final=True)
    if failed is not None:
        return failed
    raise no_key_error(call)


async def next_key(call: Call, failed: bool) -> tuple[Target, KeyEntry, Admission | None] | None:
    """The next key to try; when none is usable, after checking the configuration once
    and waiting (`key_wait_seconds`) for the first key to come back, if it is that soon."""
    chosen = await admitted_key(call)
    if chosen is None and not failed and not call.refreshed:
        # Nothing usable: keys may have been added a moment ago, on another node.
        call.refreshed = True
        snapshot = await runtime.refresh()
        entry = call.entry
        assert entry is not None  # noqa: S101
        call.entry = snapshot.groups.get(entry.name, entry)
        chosen = await admitted_key(call)
    while chosen is None and (pause := key_wait(call)) is not None:
        await wait_for_return(call, pause)
        chosen = await admitted_key(call)
    return chosen


async def admitted_key(call: Call) -> tuple[Target, KeyEntry, Admission | None] | None:
    """The next key (`choose`), counted against its group's per-key caps: a key at a cap
    is held out of this node's rotation until it has room, and another one is chosen."""
    refusals = 0
    while (chosen := choose(call, time.time())) is not None:
        target, key = chosen
        group = target.group
        if group.caps is None:
            return target, key, None
        admission = await caps.admit(key.id, group.caps)
        if admission.wait:
            now = time.time()
            group.pool.hold(key, now + admission.wait, now)
        if admission.admitted:
            return target, key, admission
        refusals += 1
        if refusals > keys_of(call):  # every key refused (each is held: a safety net)
            break
    return None


def keys_of(call: Call) -> int:
    entry = call.entry
    assert entry is not None  # noqa: S101
    if entry.is_aggregate:
        return sum(len(member.pool) for member, _ in entry.members.items)
    return len(entry.pool)


def pools_to_wait_for(entry: GroupView, at: float) -> list[GroupView]:
    """The groups whose keys a call may wait for: the group, or an aggregate's enabled
    members; none that the pool-wide 429 backs off (that is answered at once)."""
    groups = [m for m, _ in entry.members.items if m.enabled] if entry.is_aggregate else [entry]
    return [g for g in groups if g.pool.backoff_until <= at]


def key_wait(call: Call) -> float | None:
    """Seconds until the first key comes back, if the call may wait that long (what is
    left of the group's `key_wait_seconds`); None: answer now."""
    entry = call.entry
    assert entry is not None  # noqa: S101
    room = entry.key_wait - call.key_waited
    if room <= 0:
        return None
    at = time.time()
    waits = [w for g in pools_to_wait_for(entry, at) if (w := g.pool.next_ready_in(at)) is not None]
    if not waits or min(waits) > room:
        return None
    return min(waits)


async def wait_for_return(call: Call, pause: float) -> None:
    """Waits `pause` seconds for a key to come back (less if one does sooner). A client
    that leaves meanwhile ends the call at once, logged as a 499."""
    entry = call.entry
    assert entry is not None  # noqa: S101
    began = time.perf_counter()
    try:
        await wait_for_key([g.pool for g in pools_to_wait_for(entry, time.time())],
                           pause + WAKE_MARGIN)  # fmt: skip
    except asyncio.CancelledError:
        call.settle(final=False)
        with contextlib.suppress(ProxyError):
            target = call.unprepared(entry) if entry.is_aggregate else call.target(entry)
            Attempt(call, target, None, "").end(
                499, error="client disconnected while waiting for a key", blameless=True
            )
        raise
    finally:
        spent = time.perf_counter() - began
        call.key_waited += spent
        call.waited += spent


async def try_once(attempt: Attempt, base: str) -> ProxyResponse | None:
    """One attempt: the answer to give the client, or None to fail over (`attempt.failure`
    then holds the answer to give if no other attempt follows)."""
    call, target, key = attempt.call, attempt.target, attempt.key
    assert key is not None  # noqa: S101 - attempts always carry a key
    group = target.group
    sent = time.perf_counter()
    try:
        upstream = await send(call, target, key, base)
    except UNREACHABLE as exc:
        call.waited += time.perf_counter() - sent
        error = f"{type(exc).__name__}: {mask_in(str(exc), key.secret)}".rstrip(": ")
        attempt.end(502, verdict=Verdict.FAILED, error=error, failover=True, unanswered=True)
        body = group.provider.error_body(502, f"Upstream unreachable: {error}", "upstream_error")
        attempt.failure = ProxyResponse(502, [(b"content-type", b"application/json")], body)
        return None
    except asyncio.CancelledError:
        attempt.end(499, error="client disconnected", blameless=True)
        raise
    call.waited += time.perf_counter() - sent
    status = upstream.status
    if status != 429 and (rest := announced_rest(upstream.headers)) is not None:
        key_states.rest(group.pool, key, *rest)  # nearly nothing left: rest, not a failure
    if status in group.failover_codes or status == 400:
        return await refused(attempt, upstream)
    if modellist.is_model_list(call.method, target.path) and (group.redirects or group.strict):
        return await model_list(attempt, upstream)
    if status < 400 and (
        target.stream or "text/event-stream" in upstream.headers.get("content-type", "")
    ):
        # An error is read whole even for a stream (it is short), so that its text is
        # logged and the key it may quote is masked before the client sees it.
        relay = Relay(attempt, upstream)
        headers = relay_headers(upstream)
        if target.stream:  # ours, for proxies between gptload and the client
            headers = [h for h in headers if h[0] not in STREAM_HEADER_NAMES] + STREAM_HEADERS
        return ProxyResponse(status, headers, relay=relay)
    return await answer(attempt, upstream)


async def send(call: Call, target: Target, key: KeyEntry, base: str) -> aiohttp.ClientResponse:
    group = target.group
    outbound = Outbound(target.path, call.query, dict(call.headers))
    group.provider.inject_key(outbound, key.secret)
    if target.strip_usage:
        outbound.headers["accept-encoding"] = "identity"  # events are cut out of this one
    if group.header_rules:
        group.header_rules.apply(outbound.headers, key.secret, call.client_ip)
    query = ("?" + urlencode(outbound.query)) if outbound.query else ""
    url = URL(base + outbound.path + query, encoded=True)
    upstream = runtime.upstream(group)
    return await upstream.session.request(
        call.method, url, headers=outbound.headers, data=target.body or None,
        timeout=group.stream_timeout if target.stream else group.timeout,
        proxy=upstream.proxy, proxy_headers=upstream.proxy_headers, allow_redirects=False,
    )  # fmt: skip


def relay_headers(upstream: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    """The upstream's headers as the client gets them: hop-by-hop ones (and those its
    `Connection` names), `date`, `server` and `content-length` left out."""
    connection = upstream.headers.get("connection", "")
    drop = {t.encode() for t in connection_tokens(connection)} if connection else set()
    return [
        (name, value)
        for raw_name, value in upstream.raw_headers
        if (name := raw_name.lower()) not in NOT_RELAYED_RAW and name not in drop
    ]


async def read_body(attempt: Attempt, upstream: aiohttp.ClientResponse) -> bytes | None:
    """The whole raw body (None: the upstream broke off, and the attempt is ended)."""
    call, key = attempt.call, attempt.key
    assert key is not None  # noqa: S101
    sent = time.perf_counter()
    try:
        return await upstream.read()
    except UNREACHABLE as exc:
        # Nothing has reached the client yet: another key may still answer whole.
        error = f"upstream broke off: {type(exc).__name__}: {mask_in(str(exc), key.secret)}"
        attempt.end(502, verdict=Verdict.FAILED, error=error, failover=True, unanswered=True)
        body = attempt.target.group.provider.error_body(502, error, "upstream_error")
        attempt.failure = ProxyResponse(502, [(b"content-type", b"application/json")], body)
        return None
    except asyncio.CancelledError:
        attempt.end(499, error="client disconnected", blameless=True)
        raise
    finally:
        call.waited += time.perf_counter() - sent
        upstream.release()


async def refused(attempt: Attempt, upstream: aiohttp.ClientResponse) -> ProxyResponse | None:
    """A failover status (or a 400): fail over, unless it is the client's own mistake."""
    target, key = attempt.target, attempt.key
    assert key is not None  # noqa: S101
    group = target.group
    raw = await read_body(attempt, upstream)
    if raw is None:
        return None
    encoding = upstream.headers.get("content-encoding", "")
    plain = decode_whole(raw, encoding)
    message = mask_in(parse_error_message(plain or b""), key.secret)
    status = upstream.status
    verdict = classify(status, message)
    body, headers = masked(raw, plain, relay_headers(upstream), key.secret)
    response = ProxyResponse(status, headers, body)
    if status not in group.failover_codes and verdict is not Verdict.INVALID:
        # The client's mistake (Gemini says "bad key" with 400 too: that one retries).
        attempt.end(status, verdict=verdict, error=message)
        return response
    attempt.end(status, verdict=verdict, error=message, cooldown=cooldown_of(upstream.headers),
                failover=True)  # fmt: skip
    attempt.failure = response
    return None


def masked(
    raw: bytes, plain: bytes | None, headers: list[tuple[bytes, bytes]], secret: str
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """An upstream's error body and headers as the client may have them: every copy of the
    key masked. A compressed body that quotes it (`plain`, decoded) goes out decoded."""
    if not raw or not secret:
        return raw, headers
    if plain is not None and plain is not raw and secret.encode() in plain:
        return mask_in(plain, secret), [h for h in headers if h[0] != b"content-encoding"]
    return mask_in(raw, secret), headers


async def answer(attempt: Attempt, upstream: aiohttp.ClientResponse) -> ProxyResponse | None:
    """A plain (non-stream) answer: read whole, then sent with its length in one piece
    (None: the upstream broke off before its end, and the call fails over).

    Cheaper than relaying it chunk by chunk, and the client loses nothing: it could not
    use a JSON body before its last byte anyway.
    """
    target = attempt.target
    raw = await read_body(attempt, upstream)
    if raw is None:
        return None
    status = upstream.status
    encoding = upstream.headers.get("content-encoding", "")
    tap = UsageTap(target.group.provider, False, encoding, strip=False)
    tap.feed(raw)
    tap.finish()
    error = parse_error_message(tap.body_text()) if status >= 400 else ""
    if attempt.key is not None and error:
        error = mask_in(error, attempt.key.secret)
    attempt.end(status, verdict=classify(status, error), error=error, usage=tap.usage,
                cooldown=cooldown_of(upstream.headers))  # fmt: skip
    headers = relay_headers(upstream)
    if status >= 400 and attempt.key is not None:
        raw, headers = masked(raw, decode_whole(raw, encoding), headers, attempt.key.secret)
    return ProxyResponse(status, headers, raw)


async def model_list(attempt: Attempt, upstream: aiohttp.ClientResponse) -> ProxyResponse | None:
    """Buffers the upstream's model list and answers it with the group's rules applied."""
    call, target = attempt.call, attempt.target
    raw = await read_body(attempt, upstream)
    if raw is None:
        return None
    group = target.group
    status = upstream.status
    rewritten = None
    if status < 400:
        plain = decode_whole(raw, upstream.headers.get("content-encoding", ""))
        first_page = not any(k == "pageToken" for k, _ in call.query)
        if plain is not None:
            rewritten = modellist.rewrite(plain, list(group.redirects), group.strict, first_page)
    attempt.end(status, verdict=classify(status))
    if rewritten is None:
        headers = relay_headers(upstream)
        return ProxyResponse(status, headers, raw)
    return ProxyResponse(200, [(b"content-type", b"application/json")], rewritten)


class Relay:
    """The upstream body on its way to the client; the attempt ends when it does.

    How a stream ends decides what is logged: the provider's last event relayed, then
    the client or the upstream closing, is a success; a client that leaves before it is
    a 499; an upstream that stops before it is a truncated stream (an error, but not the
    key's fault). `close()` (called by the proxy's ASGI handler after every response)
    ends a relay whose body never started, as when the client left before the first byte.
    Ending never awaits: it must run to its end even in a task being cancelled.
    """

    def __init__(self, attempt: Attempt, upstream: aiohttp.ClientResponse) -> None:
        self.attempt, self.upstream = attempt, upstream
        self.sse = "text/event-stream" in upstream.headers.get("content-type", "")
        encoding = upstream.headers.get("content-encoding", "")
        target = attempt.target
        self.tap = UsageTap(target.group.provider, self.sse, encoding, strip=target.strip_usage)
        # An event that quotes the key (an error mid-stream) is masked on the way. Not in
        # a compressed stream (relayed as it is), nor for a key short enough to occur in
        # text by chance (a real provider key is long and random).
        key = attempt.key
        long_key = key is not None and len(key.secret) >= 16
        self.secret = key.secret.encode() if long_key and not encoding else b""  # type: ignore[union-attr]
        self.finished = False
        self.cut = False  # the upstream broke off: the client must not see a clean end

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        ended, error = "cut", ""
        try:
            secret = self.secret
            async for chunk in self.upstream.content.iter_any():
                if out := self.tap.feed(chunk):
                    yield mask_in(out, self.attempt.key.secret) if secret and secret in out else out  # type: ignore[union-attr]
            if rest := self.tap.finish():
                yield rest
            ended = "done"
        except UNREACHABLE as exc:  # the upstream broke off mid-body
            self.cut = True
            key = self.attempt.key
            secret = key.secret if key else ""
            error = f"upstream broke off: {type(exc).__name__}: {mask_in(str(exc), secret)}"
        except (GeneratorExit, asyncio.CancelledError):
            ended = "left"
            raise
        finally:
            self.finish(ended, error)

    def finish(self, ended: str, error: str = "") -> None:
        """`ended`: "done" (the upstream's body ended), "cut" (it broke off) or "left"
        (the client went away)."""
        if self.finished:
            return
        self.finished = True
        limiter.leave()
        if ended == "done":
            self.upstream.release()
        else:
            self.upstream.close()
        tap, status = self.tap, self.upstream.status
        complete = tap.terminal or (ended == "done" and not self.sse)
        if ended == "done" and self.sse and not complete and status < 400:
            error = "stream truncated: the upstream ended it before its last event"
        if status >= 400:
            error = error or parse_error_message(tap.body_text())
            if self.attempt.key is not None:
                error = mask_in(error, self.attempt.key.secret)
            self.attempt.end(status, verdict=classify(status, error), error=error,
                             usage=tap.usage)  # fmt: skip
        elif complete:
            self.attempt.end(status, verdict=Verdict.OK, usage=tap.usage)
        elif ended == "left":
            self.attempt.end(499, error="client disconnected", usage=tap.usage, blameless=True)
        else:
            self.attempt.end(status, error=error or "stream truncated", usage=tap.usage,
                             blameless=True)  # fmt: skip

    def close(self) -> None:
        self.finish("left")


def no_key_error(call: Call) -> ProxyError:
    """Nothing to try: the pool is throttled as a whole (429) or has no usable key (503)."""
    at = time.time()
    entry = call.entry
    assert entry is not None  # noqa: S101
    groups = [m for m, _ in entry.members.items] if entry.is_aggregate else [entry]
    backoff = [g.pool.backoff_until - at for g in groups if g.pool.backoff_until > at]
    if backoff and len(backoff) == len(groups):
        error = ProxyError(
            429,
            "The upstream is rate limiting this group's whole key pool; retry later.",
            "rate_limit_exceeded",
            min(backoff),
        )
    else:
        waits = [w for g in groups if (w := g.pool.next_ready_in(at)) is not None]
        error = ProxyError(
            503,
            "No usable upstream key in this group right now.",
            "no_keys_available",
            min(waits) if waits else None,  # none cooling: nothing comes back by itself
        )
    target = call.unprepared(entry) if entry.is_aggregate else call.target(entry)
    Attempt(call, target, None, "").end(error.status, error=error.message)
    return error


__all__ = ["CIMultiDictProxy", "ProxyError", "ProxyResponse", "limiter", "proxy"]
