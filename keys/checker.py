"""Checking upstream keys against their provider, for validation jobs and key tests.

A key is checked, by default, with its provider's model list, which authenticates the
key and costs nothing:

- openai, openai-response: `GET {upstream}/v1/models` with `Authorization: Bearer`;
- anthropic: `GET {upstream}/v1/models?limit=1` with `x-api-key` and `anthropic-version`;
- gemini: `GET {upstream}/v1beta/models?pageSize=1&key=…`.

GPT-Load's check, a minimal generation call with the group's `test_model`, is used
instead when a group names a `validation_endpoint` (openai, openai-response, anthropic;
Gemini ignores that field, as in GPT-Load) or for every group when
`CHECK_WITH_GENERATION` is true. It costs a few tokens per key, but it also catches
what a model list cannot: a key without credit, or an upstream whose model list needs
no key at all.

The group's header rules apply to checks as they do to proxied requests (`${CLIENT_IP}`
is 127.0.0.1), so an upstream that wants its key in another header is checked the same
way it is used. Only HTTP runs on an event loop (in a thread of its own); the database
work and the progress callback stay in the caller's thread, where Django's ORM works.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import aiohttp
import httpx
import orjson
from django.db import transaction
from django.utils import timezone

from gptload.lib.crypto import DecryptionError
from gptload.lib.providers import provider_for
from gptload.lib.providers.base import Outbound, ProbeCall, Provider, parse_error_message
from gptload.lib.providers.headers import HeaderRules
from gptload.lib.secrets import mask, mask_in
from gptload.lib.upstream import upstream_client
from keys.models import APIKey, Group, KeyStatus
from keys.states import Verdict, after_check, classify
from settings_app.changes import group_changed
from settings_app.models import SystemSetting

# True: every group is checked with GPT-Load's generation call (costs tokens per key).
CHECK_WITH_GENERATION = False
BATCH = 1000  # keys loaded and stored per round; also the IN-list limit
ERROR_LIMIT = 2048
CLIENT_IP = "127.0.0.1"


class CheckError(ValueError):
    """A group whose keys cannot be checked (no upstream of its own), or a bad argument."""


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    error: str = ""
    duration_ms: int = 0

    @property
    def is_valid(self) -> bool:
        return self.verdict in (Verdict.OK, Verdict.RATE_LIMITED)


# The check request ------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One group's check request, ready to carry any of its keys."""

    provider: Provider
    call: ProbeCall
    upstream: str
    header_rules: HeaderRules

    @property
    def method(self) -> str:
        return self.call.method

    @property
    def body(self) -> bytes | None:
        return orjson.dumps(self.call.body) if self.call.body is not None else None

    def request(self, secret: str) -> tuple[str, dict[str, str]]:
        """The URL and headers of the check of `secret`."""
        headers = {"content-type": "application/json"} if self.call.body is not None else {}
        outbound = Outbound(self.call.path, list(self.call.query), headers)
        self.provider.inject_key(outbound, secret)
        self.header_rules.apply(outbound.headers, secret, CLIENT_IP)
        query = "?" + urlencode(outbound.query) if outbound.query else ""
        return self.upstream + outbound.path + query, outbound.headers


def probe_for(group: Group, *, generation: bool | None = None) -> Probe:
    """How `group`'s keys are checked (`generation` None: as `CHECK_WITH_GENERATION` says);
    raises `CheckError` if the group has no upstream with a weight above 0."""
    upstream = next((u["url"] for u in group.upstreams or [] if u.get("weight", 1) > 0), None)
    if group.is_aggregate or not upstream:
        raise CheckError(
            f"group {group.name!r} has no upstream with a weight above 0 to check keys against"
        )
    provider = provider_for(group.channel_type)
    endpoint = group.validation_endpoint if provider.takes_validation_endpoint else ""
    if endpoint or (CHECK_WITH_GENERATION if generation is None else generation):
        call = provider.generation_probe(group.test_model, endpoint)
    else:
        call = provider.model_list_probe()
    rules = HeaderRules(group.header_rules or (), group.name)
    return Probe(provider, call, str(upstream).rstrip("/"), rules)


def judge(status: int, body: bytes) -> tuple[Verdict, str]:
    """What an answer to a check says about the key, and the error to record."""
    if 200 <= status < 300:
        return Verdict.OK, ""
    message = parse_error_message(body)
    error = f"[status {status}] {message}".strip()
    verdict = classify(status, message)
    if verdict is Verdict.RATE_LIMITED:
        return verdict, f"rate limited, but the key authenticates: {error}"
    if verdict is Verdict.OK:  # a 3xx: no answer about the key
        return Verdict.FAILED, error
    return verdict, error


# Sending ------------------------------------------------------------------------------------


class KeyChecker:
    """Checks keys with one probe, `concurrency` at a time, `timeout` seconds each.

    HTTP runs on an event loop in a thread of its own, with one client for the whole
    run; `check()` hands outcomes back to the caller's thread as they arrive. Use it as a
    context manager: leaving it cancels whatever is still in flight.
    """

    def __init__(self, probe: Probe, concurrency: int, timeout: float, proxy_url: str) -> None:
        self.probe = probe
        self.timeout = timeout
        concurrency = max(1, concurrency)
        # The client's own timeouts are a backstop; `asyncio.timeout` is the budget.
        self._client = upstream_client(
            proxy_url, limit=concurrency, timeout=httpx.Timeout(timeout + 1)
        )
        self._slots = asyncio.Semaphore(concurrency)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gptload-key-check")

    @classmethod
    def for_group(cls, group: Group) -> KeyChecker:
        """A checker with the group's effective validation settings and outbound proxy."""
        settings = SystemSetting.objects.effective(group.config)
        return cls(
            probe_for(group),
            int(settings["key_validation_concurrency"]),
            float(settings["key_validation_timeout_seconds"]),
            str(settings["proxy_url"]),
        )

    def __enter__(self) -> KeyChecker:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def check(self, secrets: Sequence[str]) -> Iterator[tuple[int, Outcome]]:
        """`(index in secrets, outcome)` for each secret, in the order they finish."""
        futures = {
            asyncio.run_coroutine_threadsafe(self._check(secret), self._loop): index
            for index, secret in enumerate(secrets)
        }
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()

    async def _close(self) -> None:
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._client.aclose()

    async def _check(self, secret: str) -> Outcome:
        async with self._slots:
            started = time.monotonic()
            verdict, error = await self._ask(secret)
            duration_ms = int((time.monotonic() - started) * 1000)
        return Outcome(verdict, mask_in(error, secret)[:ERROR_LIMIT], duration_ms)

    async def _ask(self, secret: str) -> tuple[Verdict, str]:
        url, headers = self.probe.request(secret)
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._client.request(
                    self.probe.method, url, headers=headers, content=self.probe.body
                )
        except TimeoutError:
            return Verdict.FAILED, f"no answer within {self.timeout:g} s"
        except (httpx.HTTPError, httpx.InvalidURL, aiohttp.ClientError, OSError, ValueError) as exc:
            # Whatever the network or a header rule's value did, it is this key's outcome,
            # not a reason to stop checking the others.
            return Verdict.FAILED, f"request failed: {exc or type(exc).__name__}"
        return judge(response.status_code, response.content)


# Validation and tests ---------------------------------------------------------------------


def validate_keys(
    group: Group,
    statuses: Sequence[str] = ("invalid",),
    key_ids: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Checks the group's keys in `statuses` (or exactly the group's keys among `key_ids`)
    and stores each outcome; returns `{"total_keys", "valid_keys", "invalid_keys"}`.

    Runs `key_validation_concurrency` checks at a time, `key_validation_timeout_seconds`
    each (the group's effective settings), through its `proxy_url`, against its first
    upstream with a weight above 0. What is stored, per outcome:

    - 2xx: status active, `consecutive_failures` 0, `cooling_until` None, error cleared.
    - 429: counted valid (the key authenticates). An invalid key becomes active as
      above; an active or cooling key is left as it is — the proxy's own 429 handling
      owns cooling, and a busy provider is no reason to bench a key.
    - 401/403 or an "invalid key" message: status invalid, `last_error` the reason.
    - anything else (5xx, other 4xx, timeout, network, a key that does not decrypt):
      counted invalid and `last_error` recorded, but the status is left alone. Such a
      failure says nothing about the key, so an active key stays in rotation and an
      invalid key stays out of it.

    A disabled key (an operator's choice) is never re-enabled nor benched: only its
    `last_error` changes. `status_changed_at` is set whenever the status is written, so
    that proxies sharing state through Redis take this result over older ones.

    Outcomes are stored every 1000 keys, so an interrupted run keeps what it learnt. The
    configuration version moves once at the end (after commit); a run by status also
    sets the group's `last_validated_at`. `progress(processed, total)` is called in the
    caller's thread, first with `(0, total)` and then after each key.

    Raises `CheckError` for an unknown status, or a group with keys to check but no
    upstream to check them against.
    """
    ids = _ids_to_check(group, statuses, key_ids)
    tally = Tally(len(ids), progress)
    tally.report()
    try:
        if ids:
            _check_and_store(group, ids, tally)
    finally:  # stopped by its progress callback or not, what was stored must reach proxies
        if tally.valid or tally.invalid:
            group_changed(group.pk)
    if key_ids is None:
        group.last_validated_at = timezone.now()
        Group.objects.filter(pk=group.pk).update(last_validated_at=group.last_validated_at)
    return {"total_keys": tally.valid + tally.invalid, "valid_keys": tally.valid,
            "invalid_keys": tally.invalid}  # fmt: skip


@dataclass
class Tally:
    """A validation run's counts, reported to its progress callback as they move."""

    total: int
    progress: Callable[[int, int], None] | None
    processed: int = 0
    valid: int = 0
    invalid: int = 0
    reported: int = -1

    def add(self, outcome: Outcome) -> None:
        if outcome.is_valid:
            self.valid += 1
        else:
            self.invalid += 1
        self.processed += 1
        self.report()

    def report(self) -> None:
        if self.progress is not None and self.processed != self.reported:
            self.reported = self.processed
            self.progress(self.processed, self.total)


def _check_and_store(group: Group, ids: list[int], tally: Tally) -> None:
    with KeyChecker.for_group(group) as checker:
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            keys = APIKey.objects.filter(group=group, pk__in=chunk).only("key_value", "status")
            rows = list(keys.order_by("id"))
            tally.processed += len(chunk) - len(rows)  # deleted since the run began
            results: list[tuple[APIKey, Outcome]] = []
            try:
                for key, outcome in _check_rows(checker, rows):
                    results.append((key, outcome))
                    tally.add(outcome)
            finally:  # a run stopped by its progress callback keeps what it learnt
                _store(results, timezone.now())
        tally.report()


def test_keys(group: Group, secrets: Sequence[str]) -> list[dict[str, Any]]:
    """Checks `secrets` against the group's upstream (as `validate_keys` does) and stores
    nothing: `[{"key_value": masked, "is_valid", "error", "duration_ms"}]`, one per
    secret in the order given. A 429 counts as valid, with a note in `error`.

    Raises `CheckError` for a group with no upstream to check against.
    """
    unique = list(dict.fromkeys(secrets))
    if not unique:
        return []
    outcomes: dict[str, Outcome] = {}
    with KeyChecker.for_group(group) as checker:
        for index, outcome in checker.check(unique):
            outcomes[unique[index]] = outcome
    return [
        {
            "key_value": mask(secret),
            "is_valid": outcomes[secret].is_valid,
            "error": outcomes[secret].error,
            "duration_ms": outcomes[secret].duration_ms,
        }
        for secret in secrets
    ]


test_keys.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, despite its name


def _ids_to_check(
    group: Group, statuses: Sequence[str], key_ids: Sequence[int] | None
) -> list[int]:
    keys = APIKey.objects.filter(group=group)
    if key_ids is None:
        unknown = [s for s in statuses if s not in KeyStatus.values]
        if unknown:
            raise CheckError(
                f"unknown key status {unknown[0]!r}; use {', '.join(KeyStatus.values)}"
            )
        return list(
            keys.filter(status__in=list(statuses)).order_by("id").values_list("id", flat=True)
        )
    wanted = list(dict.fromkeys(key_ids))
    found: list[int] = []
    for start in range(0, len(wanted), BATCH):
        found += keys.filter(pk__in=wanted[start : start + BATCH]).values_list("id", flat=True)
    return sorted(found)


def _check_rows(checker: KeyChecker, rows: list[APIKey]) -> Iterator[tuple[APIKey, Outcome]]:
    readable: list[tuple[APIKey, str]] = []
    for key in rows:
        try:
            readable.append((key, key.secret))
        except DecryptionError:
            error = "cannot decrypt: stored under another ENCRYPTION_KEY"
            yield key, Outcome(Verdict.FAILED, error)
    for index, outcome in checker.check([secret for _, secret in readable]):
        yield readable[index][0], outcome


def _store(results: list[tuple[APIKey, Outcome]], now: datetime) -> None:
    """Writes outcomes in one transaction, one UPDATE per distinct set of changes."""
    batches: dict[tuple[tuple[str, Any], ...], list[int]] = defaultdict(list)
    for key, outcome in results:
        changes = after_check(key.status, outcome.verdict, outcome.error, now)
        if changes:
            batches[tuple(sorted(changes.items()))].append(key.pk)
    with transaction.atomic():
        for changes_items, ids in batches.items():
            APIKey.objects.filter(pk__in=ids).update(**dict(changes_items), updated_at=now)
