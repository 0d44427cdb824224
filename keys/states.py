"""The upstream keys' state machine: what an attempt's outcome does to its key.

```
 active ──429, or nothing left announced──▶ cooling(until) ──time──▶ active
   │ ──401/403 or "invalid key"──▶ invalid ──validation ok──▶ active
   │ ──5xx / 408 / network: consecutive count ≥ blacklist_threshold──▶ invalid
   └──operator──▶ disabled (never chosen, never restored by itself)
```

Everything about it lives here, for the proxy and the key checker alike:

- `classify()`: what an upstream answer says about the key that carried it;
  `cooldown_of()` how long a 429 rests it; `announced_rest()` whether the provider's
  rate-limit headers say it has (nearly) nothing left, and until when;
- `KeyEntry` and `KeyPool`: a group's keys in memory, with an O(1) pick (a ring of the
  usable keys; a cooling or held key waits in a heap, out of the ring, until its time),
  the pool-wide 429 throttle, and the calls waiting for a key to come back;
- `KeyStates`: the transitions of in-memory keys, written behind to the database in
  one batch a second and shared with other nodes through Redis (a hash of the states
  that differ from plain active, and a pub/sub channel), so that a key benched on one
  node is benched on all;
- `after_check()` and `expire_cooling()`: the same transitions for stored rows (the key
  checker's verdicts, cooling that ran out).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import orjson
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from gptload.lib.providers.base import looks_like_invalid_key
from keys.models import APIKey, KeyStatus, KeyTally

log = logging.getLogger("gptload.keys")
DEFAULT_COOLDOWN = 60.0
THROTTLE_WINDOW = 10.0  # seconds in which 429s from most of a pool mean the caller is throttled
THROTTLE_MIN_KEYS = 3
ERROR_LIMIT = 2048
KEYS_CHANNEL = settings.REDIS_CHANNEL_PREFIX + "keys"
KEY_STATES = "gptload:key-states"
NODE = uuid.uuid4().hex
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
DURATION_SCALE = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# Announced limits: below these a key rests until the announced reset (not a failure).
TOKENS_SHARE = 0.01  # of the announced token limit
TOKENS_FLOOR = 1000  # tokens, when no limit is announced
ANNOUNCED_REST = 1.0  # seconds, when nothing left is announced without a reset
LONGEST_REST = 86400.0  # an announced reset further away is not believed beyond a day
OPENAI_LIMITS = tuple(
    (
        kind,
        f"x-ratelimit-remaining-{kind}",
        f"x-ratelimit-limit-{kind}",
        f"x-ratelimit-reset-{kind}",
    )
    for kind in ("requests", "tokens")
)
ANTHROPIC_LIMITS = tuple(
    (kind, f"anthropic-ratelimit-{kind}-remaining", f"anthropic-ratelimit-{kind}-limit",
     f"anthropic-ratelimit-{kind}-reset")
    for kind in ("requests", "tokens", "input-tokens", "output-tokens")
)  # fmt: skip
# What a key is stored as when it is trusted again (validation passed, operator restore).
ACTIVE_AGAIN: dict[str, Any] = {"status": KeyStatus.ACTIVE, "cooling_until": None,
                                "consecutive_failures": 0, "last_error": ""}  # fmt: skip


class Verdict(enum.Enum):
    OK = "ok"
    INVALID = "invalid"  # 401/403 or an "invalid key" message: the key itself is bad
    RATE_LIMITED = "rate_limited"  # 429: the key authenticates, the provider is busy
    FAILED = "failed"  # 5xx, 408, timeout, network: the key may be fine; counted
    CLIENT = "client"  # other 4xx: the caller's mistake, nobody's fault


def classify(status: int, message: str = "") -> Verdict:
    """What an upstream's answer (or 502 for no answer) says about the key that carried it."""
    if status < 400:
        return Verdict.OK
    if status in (401, 403) or looks_like_invalid_key(message):
        return Verdict.INVALID
    if status == 429:
        return Verdict.RATE_LIMITED
    if status >= 500 or status == 408:
        return Verdict.FAILED
    return Verdict.CLIENT


def cooldown_of(headers: Mapping[str, str]) -> float:
    """Seconds to rest a rate-limited key: Retry-After, else x-ratelimit-reset-*, else a default."""
    retry_after = headers.get("retry-after")
    if retry_after:
        try:
            return max(1.0, float(retry_after))
        except ValueError:
            try:
                return max(1.0, parsedate_to_datetime(retry_after).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens", "x-ratelimit-reset"):
        if seconds := parse_duration(headers.get(name) or ""):
            return seconds
    return DEFAULT_COOLDOWN


def parse_duration(text: str, floor: float = 1.0) -> float | None:
    """`20`, `1.5s`, `6m0s`, `1h2m3.5s`, `250ms` → seconds (at least `floor`)."""
    if not text:
        return None
    try:
        return max(floor, float(text))
    except ValueError:
        pass
    parts = DURATION_PART.findall(text)
    if not parts:
        return None
    return max(floor, sum(float(n) * DURATION_SCALE[u] for n, u in parts))


def announced_rest(
    headers: Mapping[str, str], now: float | None = None
) -> tuple[float, str] | None:
    """When the provider's rate-limit headers say a key has (nearly) nothing left: until
    when it should rest (wall clock) and why; None otherwise (most answers, and every
    answer without such headers, which costs a few lookups).

    Nearly nothing: no request left, or fewer tokens than 1% of the announced limit
    (`TOKENS_FLOOR` when no limit is announced). OpenAI's `x-ratelimit-*` announce resets
    as durations (`1s`, `6m0s`, `20ms`), Anthropic's `anthropic-ratelimit-*` as RFC 3339
    times; the latest reset of the limits that ran out is the one that counts.
    """
    if "x-ratelimit-remaining-requests" in headers or "x-ratelimit-remaining-tokens" in headers:
        return _exhausted(headers, OPENAI_LIMITS, now or time.time(), relative=True)
    if (
        "anthropic-ratelimit-requests-remaining" in headers
        or "anthropic-ratelimit-tokens-remaining" in headers
        or "anthropic-ratelimit-input-tokens-remaining" in headers
        or "anthropic-ratelimit-output-tokens-remaining" in headers
    ):
        return _exhausted(headers, ANTHROPIC_LIMITS, now or time.time(), relative=False)
    return None


def _exhausted(
    headers: Mapping[str, str], limits: tuple[tuple[str, str, str, str], ...], now: float,
    *, relative: bool,
) -> tuple[float, str] | None:  # fmt: skip
    latest: tuple[float, str] | None = None
    for kind, remaining_name, limit_name, reset_name in limits:
        remaining, limit = _count(headers.get(remaining_name)), _count(headers.get(limit_name))
        if remaining is None:
            continue
        if kind == "requests":
            low = remaining <= 0
        else:
            low = remaining < (limit * TOKENS_SHARE if limit else TOKENS_FLOOR)
        if not low:
            continue
        until = _reset_at(headers.get(reset_name) or "", now, relative)
        if latest is None or until > latest[0]:
            left = f"{remaining} of {limit}" if limit and kind != "requests" else str(remaining)
            at = time.strftime("%H:%M:%S UTC", time.gmtime(until))
            latest = until, f"rate limit announced: {left} {kind.replace('-', ' ')} left until {at}"
    return latest


def _count(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return int(float(text))
    except ValueError:
        return None


def _reset_at(text: str, now: float, relative: bool) -> float:
    """The wall-clock time a limit resets, from its header (ANNOUNCED_REST when unreadable)."""
    seconds: float | None = None
    if relative:
        seconds = parse_duration(text, floor=0.0)
    elif text:
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            seconds = (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() - now
    if seconds is None:
        seconds = ANNOUNCED_REST
    return now + min(max(seconds, 0.0), LONGEST_REST)


# In memory --------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class KeyEntry:
    id: int
    group_id: int
    secret: str
    hash: str
    stored: str
    status: str = KeyStatus.ACTIVE
    cooling_until: float = 0.0  # wall-clock seconds
    consecutive_failures: int = 0
    changed_at: float = 0.0  # when its state last changed (wall clock), here or elsewhere
    # Out of this node's rotation until then (wall clock), whatever its state: a per-key
    # cap reached. Never stored nor shared: each node learns it from the shared counts.
    held_until: float = 0.0

    def adopt(self, status: str, until: float, failures: int, at: float) -> None:
        self.status, self.cooling_until, self.consecutive_failures = status, until, failures
        self.changed_at = at

    def usable(self, now: float) -> bool:
        if self.held_until > now:
            return False
        if self.status == KeyStatus.ACTIVE:
            return True
        return self.status == KeyStatus.COOLING and self.cooling_until <= now

    def back_at(self) -> float:
        """When a cooling or held key may be chosen again (wall clock)."""
        if self.status == KeyStatus.COOLING:
            return max(self.cooling_until, self.held_until)
        return self.held_until


class KeyPool:
    """A group's keys: round robin over the usable ones in O(1) per pick.

    The ring holds exactly the usable keys; taking one out swaps the last into its slot.
    A cooling or held key waits in a heap ordered by the time it comes back, and goes
    back into the ring when a pick finds its time has come. The pool also carries the
    group's 429 back-off, and the calls waiting for a key (`wait_for_key`), woken when one
    enters the ring.
    """

    def __init__(self, keys: Iterable[KeyEntry] = ()) -> None:
        self.keys: dict[int, KeyEntry] = {}
        self.ring: list[KeyEntry] = []
        self.slot: dict[int, int] = {}
        self.cooling: list[tuple[float, int, KeyEntry]] = []
        self.turn = 0
        self.backoff_until = 0.0  # the whole pool is rate limited until then
        self.recent_429: list[tuple[float, KeyEntry]] = []
        self.waiters: set[asyncio.Future[None]] = set()
        now = time.time()
        for key in keys:
            self.keys[key.id] = key
            self.place(key, now)

    def __len__(self) -> int:
        return len(self.keys)

    def place(self, key: KeyEntry, now: float) -> None:
        """Puts `key` where its state says: the ring, the heap of keys coming back, or
        neither (invalid, disabled)."""
        if key.usable(now):
            if key.id not in self.slot and key.id in self.keys:
                self.slot[key.id] = len(self.ring)
                self.ring.append(key)
                if self.waiters:
                    self._wake_waiters()
            return
        self._leave(key)
        if key.status in (KeyStatus.ACTIVE, KeyStatus.COOLING):
            heapq.heappush(self.cooling, (key.back_at(), key.id, key))

    def hold(self, key: KeyEntry, until: float, now: float) -> None:
        """Takes `key` out of this node's rotation until `until` (a cap reached)."""
        if until > key.held_until:
            key.held_until = until
            self.place(key, now)

    def unhold(self, key: KeyEntry, now: float) -> None:
        """Ends a hold early (a concurrency slot came free)."""
        if key.held_until > now:
            key.held_until = 0.0
            self.place(key, now)

    def _leave(self, key: KeyEntry) -> None:
        index = self.slot.pop(key.id, None)
        if index is None:
            return
        last = self.ring.pop()
        if last is not key:
            self.ring[index] = last
            self.slot[last.id] = index

    def _wake(self, now: float) -> None:
        while self.cooling and self.cooling[0][0] <= now:
            _, _, key = heapq.heappop(self.cooling)
            if key.usable(now):
                self.place(key, now)

    def pick(self, now: float, exclude: set[int] | frozenset[int] = frozenset()) -> KeyEntry | None:
        """The next usable key not in `exclude`; a tried one when no other is left (a small
        pool may repeat a key on retry, as GPT-Load does); None when none is usable."""
        if self.cooling and self.cooling[0][0] <= now:
            self._wake(now)
        ring = self.ring
        count = len(ring)
        if not count:
            return None
        key = ring[self.turn % count]
        self.turn += 1
        if exclude:
            for _ in range(min(count, len(exclude) + 1) - 1):
                if key.id not in exclude:
                    break
                key = ring[self.turn % count]
                self.turn += 1
        return key

    def has_usable(self, now: float) -> bool:
        if self.cooling and self.cooling[0][0] <= now:
            self._wake(now)
        return bool(self.ring)

    def next_ready_in(self, now: float) -> float | None:
        """Seconds until the first cooling or held key is usable again, or None if none
        will come back by itself."""
        while self.cooling:
            until, _, key = self.cooling[0]
            if (
                key.id not in self.slot
                and key.status in (KeyStatus.ACTIVE, KeyStatus.COOLING)
                and key.back_at() == until
            ):
                return max(0.0, until - now)
            heapq.heappop(self.cooling)  # an entry its key has moved on from
        return None

    def _wake_waiters(self) -> None:
        # A pool may be rebuilt in a worker thread (a snapshot catch-up): hand each
        # waiter to its own loop.
        for waiter in list(self.waiters):
            if not waiter.done():
                waiter.get_loop().call_soon_threadsafe(_settle, waiter)


async def wait_for_key(pools: Iterable[KeyPool], seconds: float) -> None:
    """Returns after `seconds`, or sooner when a key enters one of `pools`' rings (a
    concurrency slot came free, another node restored a key); cancelled with its caller."""
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()
    timer = loop.call_later(seconds, _settle, woken)
    pools = list(pools)
    for pool in pools:
        pool.waiters.add(woken)
    try:
        await woken
    finally:
        timer.cancel()
        for pool in pools:
            pool.waiters.discard(woken)


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


# Transitions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SharedState:
    """A key's state as nodes tell each other through Redis."""

    id: int
    group_id: int
    status: str
    until: float
    failures: int
    at: float  # when the change happened (wall clock)

    def encode(self, node: str = NODE) -> bytes:
        return orjson.dumps({"node": node, "id": self.id, "g": self.group_id, "s": self.status,
                             "u": self.until, "f": self.failures, "t": self.at})  # fmt: skip

    @classmethod
    def decode(cls, raw: bytes | str) -> tuple[str, SharedState] | None:
        try:
            data = orjson.loads(raw)
            return str(data.get("node", "")), cls(
                int(data["id"]), int(data["g"]), str(data["s"]), float(data["u"]),
                int(data["f"]), float(data["t"]),
            )  # fmt: skip
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


class KeyStates:
    """The transitions of in-memory keys, their write-behind, and their sharing.

    Transitions run on the event loop and never wait: a change is noted for the next
    batch write (`flush()`, once a second) and, with Redis, published at once.
    """

    def __init__(self) -> None:
        self.pending: dict[int, KeyEntry] = {}
        self.errors: dict[int, str] = {}
        self.redis: Any = None  # redis.asyncio client in cluster mode
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the machine --

    def succeeded(self, key: KeyEntry) -> None:
        if key.consecutive_failures or key.status != KeyStatus.ACTIVE:
            if key.status == KeyStatus.COOLING and key.cooling_until > time.time():
                # Rested while this call was in flight (its own answer announced nothing
                # left, or another call met a 429): the rest stands.
                if key.consecutive_failures:
                    key.consecutive_failures = 0
                    self._changed(key)
                return
            key.consecutive_failures, key.status, key.cooling_until = 0, KeyStatus.ACTIVE, 0.0
            self._changed(key)

    def rest(self, pool: KeyPool, key: KeyEntry, until: float, reason: str) -> None:
        """The provider announced that `key` has (nearly) nothing left until `until`: it
        cools until then, as after a 429, but no failure is counted."""
        if key.status not in (KeyStatus.ACTIVE, KeyStatus.COOLING):
            return
        if key.status == KeyStatus.COOLING and key.cooling_until >= until:
            return
        key.status, key.cooling_until = KeyStatus.COOLING, until
        pool.place(key, time.time())
        self._changed(key, reason)

    def failed(
        self,
        pool: KeyPool,
        key: KeyEntry,
        verdict: Verdict,
        error: str,
        *,
        threshold: int,
        cooldown: float = DEFAULT_COOLDOWN,
    ) -> None:
        """Applies a failed attempt's verdict to its key (CLIENT and OK change nothing)."""
        now = time.time()
        if verdict is Verdict.INVALID:
            key.status = KeyStatus.INVALID
            pool.place(key, now)
            self._changed(key, error)
        elif verdict is Verdict.RATE_LIMITED:
            self._throttle(pool, key, cooldown, error, now)
        elif verdict is Verdict.FAILED:
            key.consecutive_failures += 1
            if threshold and key.consecutive_failures >= threshold:
                key.status = KeyStatus.INVALID
                pool.place(key, now)
            self._changed(key, error)

    def _throttle(
        self, pool: KeyPool, key: KeyEntry, cooldown: float, error: str, now: float
    ) -> None:
        """429: cools the key, unless most of the pool said 429 at once; then the pool rests."""
        recent = [(t, k) for t, k in pool.recent_429 if t > now - THROTTLE_WINDOW] + [(now, key)]
        pool.recent_429 = recent
        hit = {k for _, k in recent}
        if len(hit) >= THROTTLE_MIN_KEYS and 2 * len(hit) >= len(pool):
            pool.backoff_until = max(pool.backoff_until, now + cooldown)
            pool.recent_429 = []
            log.warning("%d keys of one pool rate limited at once; backing the group off %.0f s",
                        len(hit), cooldown)  # fmt: skip
            for benched in hit:  # the caller is throttled, not each key: they stay in rotation
                benched.status, benched.cooling_until = KeyStatus.ACTIVE, 0.0
                pool.place(benched, now)
                self._changed(benched, error if benched is key else "")
            return
        key.status, key.cooling_until = KeyStatus.COOLING, now + cooldown
        pool.place(key, now)
        self._changed(key, error)

    def _changed(self, key: KeyEntry, error: str = "") -> None:
        key.changed_at = time.time()
        self.pending[key.id] = key
        if error:
            self.errors[key.id] = error[:ERROR_LIMIT]
        if self.redis is not None:
            state = SharedState(key.id, key.group_id, key.status, key.cooling_until,
                                key.consecutive_failures, key.changed_at)  # fmt: skip
            task = asyncio.get_running_loop().create_task(self._publish(state))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def adopt(self, pool: KeyPool | None, key: KeyEntry | None, state: SharedState) -> None:
        """Another node changed a key's state: take it over, unless ours is newer."""
        if key is None or key.changed_at >= state.at:
            return
        key.adopt(state.status, state.until, state.failures, state.at)
        if pool is not None:
            pool.place(key, time.time())

    # -- write-behind --

    def take(self) -> tuple[list[KeyEntry], dict[int, str]]:
        """The changes waiting to be written, handed over (and forgotten here)."""
        batch, errors = list(self.pending.values()), self.errors
        self.pending, self.errors = {}, {}
        return batch, errors

    def give_back(self, batch: list[KeyEntry], errors: dict[int, str]) -> None:
        """A batch that could not be written waits again (newer changes kept first)."""
        for key in batch:
            self.pending.setdefault(key.id, key)
        for key_id, error in errors.items():
            self.errors.setdefault(key_id, error)

    def write_now(self) -> None:
        """Writes what waits, in this thread (at exit, where no event loop runs any more)."""
        if self.pending:
            try:
                write_states(*self.take())
            except Exception:
                log.exception("key states not written at exit")

    # -- sharing (cluster mode) --

    async def _publish(self, state: SharedState) -> None:
        payload = state.encode()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if state.status == KeyStatus.ACTIVE and not state.failures:
                    pipe.hdel(KEY_STATES, str(state.id))
                else:
                    pipe.hset(KEY_STATES, str(state.id), payload)
                pipe.publish(KEYS_CHANNEL, payload)
                await pipe.execute()
        except Exception as exc:
            log.warning("could not share key %s's state through Redis: %s", state.id, exc)

    def read_shared(self) -> list[SharedState]:
        """Every state shared through Redis (none without it); cooling states that ran out
        are dropped from the hash. Sync: for snapshot builds, off the event loop."""
        if not settings.REDIS_DSN:
            return []
        from django_redis import get_redis_connection

        try:
            redis = get_redis_connection("default")
            raw = redis.hgetall(KEY_STATES)
        except Exception as exc:
            log.warning("shared key states unavailable (%s); using the database's", exc)
            return []
        states, stale = [], []
        now = time.time()
        for field, value in raw.items():
            decoded = SharedState.decode(value)
            if decoded is None:
                stale.append(field)
                continue
            state = decoded[1]
            if state.status == KeyStatus.COOLING and state.until <= now and not state.failures:
                stale.append(field)
                continue
            states.append(state)
        if stale:
            with contextlib.suppress(Exception):
                redis.hdel(KEY_STATES, *stale)
        return states

    async def drain(self) -> None:
        """Waits for the publications in flight (at shutdown)."""
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)


def from_other_node(raw: bytes | str) -> SharedState | None:
    """A state published on `KEYS_CHANNEL` by another node (None: ours, or unreadable)."""
    decoded = SharedState.decode(raw)
    if decoded is None or decoded[0] == NODE:
        return None
    return decoded[1]


# Stored rows --------------------------------------------------------------------------------


def write_states(keys: list[KeyEntry], errors: dict[int, str]) -> None:
    """Stores in-memory key states in one transaction (not a configuration change), the
    tally of keys per state moved with them."""
    now = datetime.now(UTC)
    with transaction.atomic():
        places = APIKey.objects.filter(pk__in=[key.id for key in keys]).places()
        moves: Counter[tuple[int, str]] = Counter()
        for key in keys:
            if key.id not in places:
                continue  # deleted meanwhile
            fields: dict[str, Any] = {
                "status": key.status,
                "consecutive_failures": key.consecutive_failures,
                "cooling_until": datetime.fromtimestamp(key.cooling_until, UTC)
                if key.status == KeyStatus.COOLING
                else None,
                "status_changed_at": now,
            }
            if key.id in errors:
                fields["last_error"] = errors[key.id]
            # The rows are locked and their places read above: a plain UPDATE each.
            APIKey.objects.uncounted([key.id]).update(**fields)
            group_id, status = places[key.id]
            if status != key.status:
                moves[(group_id, status)] -= 1
                moves[(group_id, key.status)] += 1
        KeyTally.objects.add(moves)


def after_check(status: str, verdict: Verdict, error: str, now: datetime) -> dict[str, Any]:
    """The stored changes a key checker's verdict makes to a key in `status`.

    - a pass: active, its failure streak and error forgotten;
    - 429: the key authenticates: an invalid key is trusted again, an active or cooling
      one is left as it is (the proxy's own 429 handling owns cooling);
    - invalid: benched with the reason;
    - anything else (5xx, other 4xx, timeout, network): says nothing about the key, so
      only the error is recorded;
    - a disabled key (an operator's choice) only has its error recorded.
    """
    if status == KeyStatus.DISABLED:
        return {"last_error": error}
    if verdict is Verdict.OK or (verdict is Verdict.RATE_LIMITED and status == KeyStatus.INVALID):
        return {**ACTIVE_AGAIN, "status_changed_at": now}
    if verdict is Verdict.RATE_LIMITED:
        return {}
    if verdict is Verdict.INVALID:
        return {"status": KeyStatus.INVALID, "cooling_until": None, "status_changed_at": now,
                "last_error": error}  # fmt: skip
    return {"last_error": error}


def expire_cooling(now: datetime | None = None) -> int:
    """Stores keys whose cooling has ended as active; returns how many.

    Proxies put such a key back in rotation the moment its time comes; this makes the
    admin and the API show what they already do.
    """
    now = now or timezone.now()
    return APIKey.objects.filter(status=KeyStatus.COOLING, cooling_until__lte=now).update(
        status=KeyStatus.ACTIVE, cooling_until=None, status_changed_at=now
    )


key_states = KeyStates()
