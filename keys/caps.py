"""Per-key caps: the calls each upstream key is sent per minute, per day and at once.

A group may cap what each of its upstream keys is sent (`key_rpm`, `key_rpd`,
`key_max_concurrency`; 0: no cap). Before an attempt goes out on a key of such a group,
`caps.admit()` counts it against the key's caps, or refuses it and says for how long the
key is full; the proxy then holds the key out of its rotation (`KeyPool.hold`) for that
long. Groups without caps never come here.

Where the counts live: with Redis, in Redis, so that every node counts each call once
(one script call per attempt, `ADMIT`); without it, in this process. While Redis cannot
be reached, each node counts on its own (a warning says so, once).

- **Windows** (a minute, a day) are cut in `SLICES` slices (1 s, 24 min); a call is
  admitted while the calls of the current slice and of the `SLICES` before it stay under
  the cap. Any span of one window then holds at most the cap, whatever the alignment,
  and a full key comes back at most one slice later than an exact sliding log would let
  it; memory per key is at most `SLICES + 1` counters, whatever the cap.
- **Concurrency**: one slot per call in flight, given back when its attempt ends
  (`release`, idempotent; the proxy calls it on every way out, a cancelled call
  included). In Redis a slot is a member of a sorted set scored by the end of its lease;
  each node renews the leases of its own calls (`renew`, from the runtime's
  once-a-second task), so the slots of a node that died vanish within `LEASE`. A key
  whose slots are full is held `RECHECK` seconds, or until a slot of this node's frees.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from gptload.lib.dsn import database_tag
from keys.states import NODE

log = logging.getLogger("gptload.keys")
SLICES = 60
MINUTE, DAY = 60.0, 86400.0
RECHECK = 1.0  # seconds a key whose concurrency slots are full stays out of rotation
LEASE = 60.0  # seconds a concurrency slot outlives its node's last renewal
RENEW_EVERY = LEASE / 3
REDIS_RETRY = 5.0  # seconds of counting in-process after Redis failed, before trying again
PREFIX = "gptload:key-cap:"  # then the database's tag (`database_tag`: key ids are its)

# KEYS: in-flight slots (sorted set), minute slices (hash), day slices (hash).
# ARGV: concurrency cap, rpm cap, rpd cap (0: none), the slot's name, the lease (ms).
# Returns {admitted, wait_ms, cap, count}: refused, wait_ms is how long the key stays
# full (-1: until a slot frees) and cap which cap (1 concurrency, 2 rpm, 3 rpd) with its
# count; admitted, wait_ms is how long the key is full now that it took this call (0:
# room left). Time is the Redis server's, so that nodes' clocks do not matter.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local conc, rpm, rpd = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lease = tonumber(ARGV[5])
local SLICES = 60
local function window(key, length)
  local current = math.floor(now / length)
  local flat = redis.call('HGETALL', key)
  local slices, total, stale = {}, 0, {}
  for i = 1, #flat, 2 do
    local s = tonumber(flat[i])
    if s < current - SLICES then
      stale[#stale + 1] = flat[i]
    else
      local c = tonumber(flat[i + 1])
      total = total + c
      slices[#slices + 1] = {s, c}
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  return total, slices, current
end
local function free_in(slices, total, cap, length)
  table.sort(slices, function(a, b) return a[1] < b[1] end)
  local removed = 0
  for _, slice in ipairs(slices) do
    removed = removed + slice[2]
    if total - removed < cap then return (slice[1] + SLICES + 1) * length - now end
  end
  return 0
end
local inflight = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  inflight = redis.call('ZCARD', KEYS[1])
  if inflight >= conc then return {0, -1, 1, inflight} end
end
local windows = {}
for i, cap in ipairs({rpm, rpd}) do
  if cap > 0 then
    local length = (i == 1 and 60000 or 86400000) / SLICES
    local total, slices, current = window(KEYS[i + 1], length)
    if total >= cap then return {0, free_in(slices, total, cap, length), i + 1, total} end
    windows[#windows + 1] = {KEYS[i + 1], cap, length, total, slices, current}
  end
end
local full = 0
if conc > 0 then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], lease)
  if inflight + 1 >= conc then full = -1 end
end
for _, w in ipairs(windows) do
  local key, cap, length, total, slices, current = unpack(w)
  redis.call('HINCRBY', key, current, 1)
  redis.call('PEXPIRE', key, (SLICES + 2) * length)
  slices[#slices + 1] = {current, 1}
  if total + 1 >= cap then full = math.max(full, free_in(slices, total + 1, cap, length)) end
end
return {1, full, 0, 0}
"""
# KEYS: in-flight sorted sets; ARGV: the lease (ms), then each set's slot, in order.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, lease)
end
return #KEYS
"""
CAP_NAMES = {1: "key_max_concurrency", 2: "key_rpm", 3: "key_rpd"}


@dataclass(frozen=True, slots=True)
class KeyCaps:
    """A group's per-key caps (0: none)."""

    rpm: int
    rpd: int
    concurrency: int

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> KeyCaps | None:
        """The caps in a group's effective settings; None when it sets none."""
        caps = cls(int(settings["key_rpm"]), int(settings["key_rpd"]),
                   int(settings["key_max_concurrency"]))  # fmt: skip
        return caps if caps.rpm or caps.rpd or caps.concurrency else None


@dataclass(slots=True)
class Admission:
    """An attempt's answer from the caps.

    Refused: `wait` is how long its key stays full. Admitted: `wait` is how long the key
    is full now that it took this call (0: room left), and `slot` the concurrency slot
    to give back (`""`: none taken)."""

    admitted: bool
    wait: float = 0.0
    reason: str = ""
    slot: str = ""
    shared: bool = False  # the slot is in Redis
    released: bool = False


class SlidingCount:
    """Calls in the last window: counts per slice, oldest first, and their total."""

    __slots__ = ("length", "slices", "total")

    def __init__(self, window: float) -> None:
        self.length = window / SLICES
        self.slices: deque[list[int]] = deque()
        self.total = 0

    def count(self, now: float) -> int:
        first = int(now // self.length) - SLICES
        slices = self.slices
        while slices and slices[0][0] < first:
            self.total -= slices.popleft()[1]
        return self.total

    def add(self, now: float) -> None:
        current = int(now // self.length)
        if self.slices and self.slices[-1][0] == current:
            self.slices[-1][1] += 1
        else:
            self.slices.append([current, 1])
        self.total += 1

    def free_in(self, cap: int, now: float) -> float:
        """Seconds until fewer than `cap` calls are counted (0: already)."""
        removed = 0
        for index, count in self.slices:
            removed += count
            if self.total - removed < cap:
                return max(0.0, (index + SLICES + 1) * self.length - now)
        return 0.0


class LocalCounts:
    """The caps counted in this process (no Redis, or Redis out of reach)."""

    def __init__(self) -> None:
        self.minute: dict[int, SlidingCount] = {}
        self.day: dict[int, SlidingCount] = {}
        self.inflight: dict[int, int] = {}

    def admit(self, key_id: int, caps: KeyCaps, now: float) -> Admission:
        inflight = self.inflight.get(key_id, 0)
        if caps.concurrency and inflight >= caps.concurrency:
            return refused(1, inflight, -1)
        windows = []
        for cap, counts, length in ((caps.rpm, self.minute, MINUTE), (caps.rpd, self.day, DAY)):
            if cap:
                window = counts.get(key_id)
                if window is None:
                    window = counts[key_id] = SlidingCount(length)
                if window.count(now) >= cap:
                    return refused(2 if length == MINUTE else 3, window.total,
                                   window.free_in(cap, now))  # fmt: skip
                windows.append((cap, window))
        full = 0.0
        if caps.concurrency:
            self.inflight[key_id] = inflight + 1
            if inflight + 1 >= caps.concurrency:
                full = RECHECK
        for cap, window in windows:
            window.add(now)
            if window.total >= cap:
                full = max(full, window.free_in(cap, now))
        return Admission(True, full, slot="local" if caps.concurrency else "")

    def release(self, key_id: int) -> None:
        left = self.inflight.get(key_id, 0) - 1
        if left > 0:
            self.inflight[key_id] = left
        else:
            self.inflight.pop(key_id, None)


def refused(cap: int, count: int, wait_ms_or_s: float, *, ms: bool = False) -> Admission:
    wait = RECHECK if wait_ms_or_s < 0 else (wait_ms_or_s / 1000 if ms else wait_ms_or_s)
    if cap == 1:
        reason = f"key_max_concurrency: {count} calls in flight"
    else:
        reason = f"{CAP_NAMES[cap]}: {count} calls in the last {'minute' if cap == 2 else 'day'}"
    return Admission(False, max(wait, 0.001), reason)


class KeyCapCounter:
    """Admits and releases attempts against their key's caps; Redis when `redis` is set
    (by the proxy's runtime, in cluster mode), else in this process."""

    def __init__(self) -> None:
        self.local = LocalCounts()
        self.redis: Any = None  # redis.asyncio client (`use`)
        self.prefix = PREFIX
        self._admit: Any = None
        self._renew: Any = None
        self.leases: dict[str, tuple[str, float]] = {}  # slot → its set, last renewed
        self._serial = itertools.count(1)
        self._redis_failed_at: float | None = None
        self._renew_failing = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def use(self, redis: Any) -> None:
        """Counts in `redis` from now on (None: in this process)."""
        self.redis = redis
        if redis is not None:
            self._admit, self._renew = redis.register_script(ADMIT), redis.register_script(RENEW)
            self.prefix = f"{PREFIX}{database_tag(settings.DATABASES['default'])}:"

    async def admit(self, key_id: int, caps: KeyCaps) -> Admission:
        """Counts an attempt on key `key_id`, or refuses it (the key is at a cap)."""
        redis = self.redis
        failed = self._redis_failed_at
        if redis is None or (failed is not None and time.monotonic() - failed < REDIS_RETRY):
            return self.local.admit(key_id, caps, time.time())
        slot = f"{NODE}:{next(self._serial)}" if caps.concurrency else ""
        keys = [f"{self.prefix}{{{key_id}}}:{name}" for name in ("inflight", "minute", "day")]
        try:
            admitted, wait_ms, cap, count = await self._admit(
                keys, [caps.concurrency, caps.rpm, caps.rpd, slot, int(LEASE * 1000)]
            )
        except asyncio.CancelledError:
            if slot:  # the script may have taken the slot before the caller left
                self._forget(keys[0], slot)
            raise
        except Exception as exc:
            if self._redis_failed_at is None:
                log.warning("per-key caps counted in this process: Redis failed (%s)", exc)
            self._redis_failed_at = time.monotonic()
            return self.local.admit(key_id, caps, time.time())
        if self._redis_failed_at is not None:
            log.warning("per-key caps counted in Redis again")
            self._redis_failed_at = None
        if not admitted:
            return refused(int(cap), int(count), float(wait_ms), ms=True)
        if slot:
            self.leases[slot] = (keys[0], time.monotonic())
        wait = RECHECK if wait_ms < 0 else wait_ms / 1000
        return Admission(True, wait, slot=slot, shared=True)

    def release(self, key_id: int, admission: Admission) -> None:
        """Gives back the admission's concurrency slot, once. Never waits: safe in a
        task being cancelled."""
        if admission.released or not admission.slot:
            return
        admission.released = True
        if not admission.shared:
            self.local.release(key_id)
            return
        lease = self.leases.pop(admission.slot, None)
        if lease is not None:
            self._forget(lease[0], admission.slot)

    def _forget(self, inflight: str, slot: str) -> None:
        self.leases.pop(slot, None)
        if self.redis is None:
            return
        task = asyncio.get_running_loop().create_task(self._remove(inflight, slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _remove(self, inflight: str, slot: str) -> None:
        try:
            await self.redis.zrem(inflight, slot)
        except Exception as exc:  # its lease runs out instead
            log.warning("concurrency slot not given back to Redis (%s); it expires", exc)

    async def renew(self) -> None:
        """Renews the leases of this node's calls in flight that are due (Redis only)."""
        if self.redis is None or not self.leases:
            return
        now = time.monotonic()
        due = [(slot, key) for slot, (key, at) in self.leases.items() if now - at >= RENEW_EVERY]
        if not due:
            return
        try:
            await self._renew([k for _, k in due], [int(LEASE * 1000), *(s for s, _ in due)])
        except Exception as exc:  # tried again each second; a lease lasts LEASE
            if not self._renew_failing:
                log.warning("concurrency leases not renewed in Redis (%s); retrying", exc)
            self._renew_failing = True
            return
        self._renew_failing = False
        for slot, key in due:
            if slot in self.leases:
                self.leases[slot] = (key, now)

    async def drain(self) -> None:
        """Waits for the slots being given back (at shutdown)."""
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)


caps = KeyCapCounter()
