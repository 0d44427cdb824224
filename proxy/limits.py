"""Access keys' limits: calls and tokens per minute, tokens per day and per month, calls
in flight, each counted once for the whole cluster.

A call made with a limited access key takes a `Ticket` before its first attempt
(`take`) and settles it when it ends (`settle`), with the tokens the answer says it used.
Tokens are *reserved* on the way in (the call's output bound plus its prompt estimated
from its size, `reservation`), so that concurrent calls cannot overshoot: a call is
refused when what is spent or reserved already, plus its own reservation, passes a
limit. Settling replaces the reservation with the real usage (or keeps it when the
answer reported none: a stream cut short may still have cost tokens).

The windows: a minute is sixty one-second buckets, strict to the second, and a refusal's
`Retry-After` is when enough of the oldest buckets have left the window; a day and a
month are calendar ones in the `TZ` time zone, and their refusal lasts until they end.

Where it is counted: with Redis, one Lua script takes and one settles (atomic across
every worker and node, the minute measured by Redis' clock); without Redis, the same
arithmetic in this process, which one event loop makes atomic (with several web workers
and no Redis each worker counts its own: `serve` says so at start). If Redis cannot be
reached a call is counted here instead of being refused: a gateway that stops serving
because its counter is away would be worse than a limit counted per node for a while.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from gptload.lib.dsn import database_tag
from keys.states import NODE

log = logging.getLogger("gptload.proxy")
WINDOW = 60  # seconds in the per-minute windows
NUMBERS = itertools.count()  # tickets are this process's (`NODE`), numbered
INFLIGHT_TTL = 900  # seconds after which a call's slot is freed if nobody settled it (a dead node)
# When a call states no output bound, this many tokens are reserved for its answer.
DEFAULT_OUTPUT = 4096
OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class Limited(Protocol):
    """What the counters need to know of an access key (`access.models.AccessRule`)."""

    @property
    def id(self) -> int: ...
    @property
    def rpm(self) -> int: ...
    @property
    def tpm(self) -> int: ...
    @property
    def daily_tokens(self) -> int: ...
    @property
    def monthly_tokens(self) -> int: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def counts_tokens(self) -> bool: ...  # tpm, daily or monthly tokens are limited


@dataclass
class Ticket:
    """A call's place in its access key's counters, until it is settled."""

    access_id: int
    second: int  # the minute bucket its request and tokens went into
    minute_tokens: int  # tokens put into that bucket (the reservation, at most the tpm)
    reserved: int  # tokens added to the day and the month
    day: str
    month: str
    id: str = field(default_factory=lambda: f"{NODE}:{next(NUMBERS)}")
    settled: bool = False


@dataclass(frozen=True)
class Refusal:
    """Which limit refused a call, and in how many seconds it could pass."""

    limit: str
    retry_after: int

    @property
    def message(self) -> str:
        return LIMIT_MESSAGES[self.limit]


LIMIT_MESSAGES = {
    "rpm": "This access key's requests per minute are used up.",
    "tpm": "This access key's tokens per minute are used up.",
    "daily_tokens": "This access key's tokens for today are used up.",
    "monthly_tokens": "This access key's tokens for this month are used up.",
    "max_concurrency": "This access key has as many calls in flight as it may.",
}


def reservation(data: dict[str, Any] | None, body_size: int) -> int:
    """Tokens a call may cost at most, as far as can be told before it is made: its
    prompt (a token is about 4 bytes of JSON; counted generously) and its output bound
    (`max_tokens` and kin, Gemini's `generationConfig.maxOutputTokens`), else
    `DEFAULT_OUTPUT`."""
    output = 0
    if data is not None:
        for name in OUTPUT_FIELDS:
            value = data.get(name)
            if isinstance(value, int) and value > 0:
                output = value
                break
        else:
            config = data.get("generationConfig")
            value = config.get("maxOutputTokens") if isinstance(config, dict) else None
            if isinstance(value, int) and value > 0:
                output = value
    return math.ceil(body_size / 4) + (output or DEFAULT_OUTPUT)


@dataclass(frozen=True)
class Calendar:
    """A day and its month in the `TZ` zone, with the times (Unix seconds) they end."""

    day: str
    day_starts: float
    day_ends: float
    month: str
    month_ends: float

    @classmethod
    def of(cls, now: float) -> Calendar:
        moment = datetime.fromtimestamp(now, ZoneInfo(str(settings.TIME_ZONE)))
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        midnight = (moment + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        first = (moment.replace(day=28) + timedelta(days=4)).replace(
            day=1, hour=0, minute=0, second=0, microsecond=0
        )
        return cls(moment.strftime("%Y%m%d"), start.timestamp(), midnight.timestamp(),
                   moment.strftime("%Y%m"), first.timestamp())  # fmt: skip


_calendar: Calendar | None = None


@receiver(setting_changed)
def _forget_calendar(setting: str, **kwargs: Any) -> None:
    """A new `TZ` (tests change it) starts a new calendar."""
    global _calendar
    if setting == "TIME_ZONE":
        _calendar = None


def calendar(now: float) -> tuple[str, int, str, int]:
    """The day and month of `now` in the `TZ` zone, and the seconds until each ends
    (worked out once a day: a call pays a comparison)."""
    global _calendar
    known = _calendar
    if known is None or not known.day_starts <= now < known.day_ends:
        known = _calendar = Calendar.of(now)
    return (known.day, max(1, math.ceil(known.day_ends - now)),
            known.month, max(1, math.ceil(known.month_ends - now)))  # fmt: skip


def wait_for(buckets: dict[int, int], excess: int, now: float) -> int:
    """Seconds until `excess` of the window's count has left it (oldest buckets first)."""
    freed = 0
    for second in sorted(buckets):
        freed += buckets[second]
        if freed >= excess:
            return max(1, math.ceil(second + WINDOW - now))
    return WINDOW


# In this process ---------------------------------------------------------------------------


@dataclass
class Counters:
    """One access key's counts in this process, with running totals of the minute (a call
    adds to them; the buckets that leave the window are taken off once a second)."""

    requests: dict[int, int] = field(default_factory=dict)  # second → calls
    tokens: dict[int, int] = field(default_factory=dict)  # second → tokens
    calls: int = 0  # the minute's, in all
    spent: int = 0  # the minute's tokens, in all
    day: str = ""
    day_used: int = 0
    month: str = ""
    month_used: int = 0
    inflight: dict[str, float] = field(default_factory=dict)  # ticket id → expiry
    pruned: int = 0  # the second of the last prune

    def prune(self, now: float) -> None:
        second = int(now)
        if second == self.pruned:
            return
        self.pruned = second
        oldest = second - WINDOW + 1
        for second_ in [s for s in self.requests if s < oldest]:
            self.calls -= self.requests.pop(second_)
        for second_ in [s for s in self.tokens if s < oldest]:
            self.spent -= self.tokens.pop(second_)
        if self.inflight:
            for ticket in [t for t, expiry in self.inflight.items() if expiry <= now]:
                del self.inflight[ticket]

    def turn(self, day: str, month: str) -> None:
        """A new day (or month) starts from nothing."""
        if day != self.day:
            self.day, self.day_used = day, 0
        if month != self.month:
            self.month, self.month_used = month, 0


class LocalLimits:
    """The counters of every access key, in this process."""

    def __init__(self) -> None:
        self.keys: dict[int, Counters] = {}

    def take(self, access: Limited, reserve: int, now: float) -> Ticket | Refusal:
        counters = self.keys.get(access.id)
        if counters is None:
            counters = self.keys[access.id] = Counters()
        counters.prune(now)
        day, day_left, month, month_left = calendar(now)
        counters.turn(day, month)
        minute_tokens = min(reserve, access.tpm) if access.tpm else reserve
        refusals = []
        if access.rpm and (excess := counters.calls + 1 - access.rpm) > 0:
            refusals.append(Refusal("rpm", wait_for(counters.requests, excess, now)))
        if access.tpm and (excess := counters.spent + minute_tokens - access.tpm) > 0:
            refusals.append(Refusal("tpm", wait_for(counters.tokens, excess, now)))
        daily, monthly = access.daily_tokens, access.monthly_tokens
        if daily and counters.day_used + min(reserve, daily) > daily:
            refusals.append(Refusal("daily_tokens", day_left))
        if monthly and counters.month_used + min(reserve, monthly) > monthly:
            refusals.append(Refusal("monthly_tokens", month_left))
        if access.max_concurrency and len(counters.inflight) >= access.max_concurrency:
            refusals.append(Refusal("max_concurrency", 1))
        if refusals:
            return max(refusals, key=lambda refusal: refusal.retry_after)
        second = int(now)
        ticket = Ticket(access.id, second, minute_tokens, reserve, day, month)
        counters.requests[second] = counters.requests.get(second, 0) + 1
        counters.calls += 1
        if access.counts_tokens:
            counters.tokens[second] = counters.tokens.get(second, 0) + minute_tokens
            counters.spent += minute_tokens
            counters.day_used += reserve
            counters.month_used += reserve
        counters.inflight[ticket.id] = now + INFLIGHT_TTL
        return ticket

    def settle(self, ticket: Ticket, used: int | None) -> None:
        counters = self.keys.get(ticket.access_id)
        if counters is None:
            return
        counters.inflight.pop(ticket.id, None)
        if used is None:
            return
        bucket = counters.tokens.get(ticket.second)
        if bucket is not None:
            changed = max(0, bucket + used - ticket.minute_tokens)
            counters.tokens[ticket.second] = changed
            counters.spent += changed - bucket
        if ticket.day == counters.day:
            counters.day_used = max(0, counters.day_used + used - ticket.reserved)
        if ticket.month == counters.month:
            counters.month_used = max(0, counters.month_used + used - ticket.reserved)


# In Redis ------------------------------------------------------------------------------------

# KEYS: calls (hash second → n), tokens (hash second → n), day, month, in flight (zset).
# ARGV: rpm, tpm, daily, monthly, max concurrency, reservation, minute tokens, ticket id,
#       day ttl, month ttl, in-flight ttl, counts tokens (0/1).
# Returns {1, second} when taken, {0, limit index, retry after in ms} when refused.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local second = tonumber(t[1])
local oldest = second - 59
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local daily, monthly = tonumber(ARGV[3]), tonumber(ARGV[4])
local most, reserve, mtokens = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local function window(key)
  local flat = redis.call('HGETALL', key)
  local seconds, counts, total = {}, {}, 0
  for i = 1, #flat, 2 do
    local s, n = tonumber(flat[i]), tonumber(flat[i + 1])
    if s < oldest then redis.call('HDEL', key, flat[i]) else
      table.insert(seconds, s); counts[s] = n; total = total + n end
  end
  table.sort(seconds)
  return seconds, counts, total
end
local function wait(seconds, counts, excess)
  local freed = 0
  for _, s in ipairs(seconds) do
    freed = freed + counts[s]
    if freed >= excess then return math.max(1000, math.ceil((s + 60 - now) * 1000)) end
  end
  return 60000
end
local refused, retry = 0, 0
local function refuse(index, ms)
  if ms > retry then refused, retry = index, ms end
end
if rpm > 0 then
  local seconds, counts, total = window(KEYS[1])
  if total + 1 > rpm then refuse(1, wait(seconds, counts, total + 1 - rpm)) end
end
if tpm > 0 then
  local seconds, counts, total = window(KEYS[2])
  if total + mtokens > tpm then refuse(2, wait(seconds, counts, total + mtokens - tpm)) end
end
if daily > 0 then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used + math.min(reserve, daily) > daily then refuse(3, tonumber(ARGV[9]) * 1000) end
end
if monthly > 0 then
  local used = tonumber(redis.call('GET', KEYS[4]) or '0')
  if used + math.min(reserve, monthly) > monthly then refuse(4, tonumber(ARGV[10]) * 1000) end
end
if most > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  if redis.call('ZCARD', KEYS[5]) >= most then refuse(5, 1000) end
end
if refused > 0 then return {0, refused, retry} end
redis.call('HINCRBY', KEYS[1], second, 1)
redis.call('EXPIRE', KEYS[1], 120)
if ARGV[12] == '1' then
  redis.call('HINCRBY', KEYS[2], second, mtokens)
  redis.call('EXPIRE', KEYS[2], 120)
  redis.call('INCRBY', KEYS[3], reserve)
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[9]) + 3600)
  redis.call('INCRBY', KEYS[4], reserve)
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[10]) + 3600)
end
redis.call('ZADD', KEYS[5], now + tonumber(ARGV[11]), ARGV[8])
redis.call('EXPIRE', KEYS[5], tonumber(ARGV[11]))
return {1, second}
"""

# KEYS: tokens, day, month, in flight. ARGV: ticket id, second, minute tokens, reserved,
# used (-1: unknown, the reservation stands).
SETTLE = """
redis.call('ZREM', KEYS[4], ARGV[1])
local used = tonumber(ARGV[5])
if used < 0 then return 0 end
local function adjust(key, fieldname, delta)
  if fieldname then
    if redis.call('HEXISTS', key, fieldname) == 0 then return end
    if redis.call('HINCRBY', key, fieldname, delta) < 0 then redis.call('HSET', key, fieldname, 0) end
  else
    if redis.call('EXISTS', key) == 0 then return end
    local value = redis.call('INCRBY', key, delta)
    if value < 0 then redis.call('INCRBY', key, -value) end
  end
end
adjust(KEYS[1], ARGV[2], used - tonumber(ARGV[3]))
adjust(KEYS[2], nil, used - tonumber(ARGV[4]))
adjust(KEYS[3], nil, used - tonumber(ARGV[4]))
return 1
"""
LIMIT_NAMES = ("", "rpm", "tpm", "daily_tokens", "monthly_tokens", "max_concurrency")


def redis_prefix() -> str:
    """Where this installation's counters live in Redis (access key ids are its
    database's: `database_tag`)."""
    return f"gptload:access:{database_tag(settings.DATABASES['default'])}:"


def redis_keys(prefix: str, access_id: int, day: str, month: str) -> list[str]:
    base = f"{prefix}{access_id}:"
    return [base + "calls", base + "tokens", base + "day:" + day, base + "month:" + month,
            base + "inflight"]  # fmt: skip


class RedisLimits:
    """The counters in Redis, shared by every worker and node; this process's own
    (`fallback`) while Redis cannot be reached."""

    def __init__(self, redis: Any, fallback: LocalLimits) -> None:
        self.redis = redis
        self.fallback = fallback
        self.prefix = redis_prefix()
        self.take_script = redis.register_script(TAKE)
        self.settle_script = redis.register_script(SETTLE)
        self.failing = False

    async def take(self, access: Limited, reserve: int, now: float) -> Ticket | Refusal:
        day, day_left, month, month_left = calendar(now)
        minute_tokens = min(reserve, access.tpm) if access.tpm else reserve
        ticket = Ticket(access.id, int(now), minute_tokens, reserve, day, month)
        args = [access.rpm, access.tpm, access.daily_tokens, access.monthly_tokens,
                access.max_concurrency, reserve, minute_tokens, ticket.id, day_left,
                month_left, INFLIGHT_TTL, int(access.counts_tokens)]  # fmt: skip
        try:
            answer = await self.take_script(
                keys=redis_keys(self.prefix, access.id, day, month), args=args
            )
        except Exception as exc:
            return self._fallen_back(exc).take(access, reserve, now)
        self._back()
        if int(answer[0]) == 0:
            return Refusal(LIMIT_NAMES[int(answer[1])], max(1, math.ceil(int(answer[2]) / 1000)))
        ticket.second = int(answer[1])
        return ticket

    async def settle(self, ticket: Ticket, used: int | None) -> None:
        if ticket.id in self.fallback.keys.get(ticket.access_id, Counters()).inflight:
            self.fallback.settle(ticket, used)  # taken here while Redis was away
            return
        keys = redis_keys(self.prefix, ticket.access_id, ticket.day, ticket.month)
        args = [ticket.id, ticket.second, ticket.minute_tokens, ticket.reserved,
                -1 if used is None else used]  # fmt: skip
        try:
            await self.settle_script(keys=[keys[1], keys[2], keys[3], keys[4]], args=args)
        except Exception as exc:  # the slot expires by itself (INFLIGHT_TTL)
            self._fallen_back(exc)

    def _fallen_back(self, exc: Exception) -> LocalLimits:
        if not self.failing:
            log.warning("access key limits: Redis unreachable (%s); counting in this "
                        "process until it is back", exc)  # fmt: skip
            self.failing = True
        return self.fallback

    def _back(self) -> None:
        if self.failing:
            log.warning("access key limits: counting in Redis again")
            self.failing = False


# The process's limits ------------------------------------------------------------------------


class Limits:
    """`take` and `settle` for the proxy, in Redis when there is one, else here."""

    def __init__(self) -> None:
        self.local = LocalLimits()
        self.shared: RedisLimits | None = None
        self._settling: set[asyncio.Task[None]] = set()

    def use_redis(self, redis: Any) -> None:
        self.shared = RedisLimits(redis, self.local) if redis is not None else None

    async def take(self, access: Limited, reserve: int) -> Ticket | Refusal:
        now = time.time()
        if self.shared is not None:
            return await self.shared.take(access, reserve, now)
        return self.local.take(access, reserve, now)

    def settle(self, ticket: Ticket, used: int | None) -> None:
        """Gives the call's place back (at once here; in Redis by a task of its own, so
        that the call's end never waits on it). Settling twice does nothing."""
        if ticket.settled:
            return
        ticket.settled = True
        if self.shared is None:
            self.local.settle(ticket, used)
            return
        task = asyncio.get_running_loop().create_task(self.shared.settle(ticket, used))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def drain(self) -> None:
        """Waits for the settles in flight (at shutdown)."""
        for task in list(self._settling):
            await asyncio.gather(task, return_exceptions=True)


limits = Limits()
