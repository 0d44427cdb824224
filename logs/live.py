"""Live request counters: what the dashboard shows before the log rows are written.

Every final attempt is counted here, per minute, the moment it ends (a dict update, on
the event loop). Without Redis the counts are this process's; with Redis each process
adds its new counts to shared per-minute hashes once a second, so every node's dashboard
sees the whole cluster. Kept for an hour.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from django.conf import settings

KEEP_MINUTES = 60
PREFIX = "gptload:live:"


def minute_of(timestamp: float) -> int:
    return int(timestamp // 60)


class LiveCounters:
    def __init__(self) -> None:
        self.minutes: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # ok, failed, tokens
        self.unsent: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])

    def note(self, timestamp: float, success: bool, tokens: int) -> None:
        minute = minute_of(timestamp)
        for buckets in (self.minutes, self.unsent) if settings.REDIS_DSN else (self.minutes,):
            counts = buckets[minute]
            counts[0 if success else 1] += 1
            counts[2] += tokens
        if len(self.minutes) > KEEP_MINUTES + 5:
            oldest = minute - KEEP_MINUTES
            for old in [m for m in self.minutes if m < oldest]:
                del self.minutes[old]

    async def push(self, redis: Any) -> None:
        """Adds the counts not yet shared to Redis (cluster mode); kept for a later try
        when Redis is away."""
        if not self.unsent:
            return
        unsent, self.unsent = self.unsent, defaultdict(lambda: [0, 0, 0])
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for minute, (ok, failed, tokens) in unsent.items():
                    key = f"{PREFIX}{minute}"
                    pipe.hincrby(key, "ok", ok)
                    pipe.hincrby(key, "failed", failed)
                    pipe.hincrby(key, "tokens", tokens)
                    pipe.expire(key, (KEEP_MINUTES + 5) * 60)
                await pipe.execute()
        except Exception:
            for minute, counts in unsent.items():
                mine = self.unsent[minute]
                for index, count in enumerate(counts):
                    mine[index] += count
            raise

    def read(self, minutes: int, now: float | None = None) -> list[tuple[int, int, int]]:
        """(ok, failed, tokens) for each of the last `minutes` minutes, oldest first, the
        current (unfinished) minute last. Sync: Redis is asked through django-redis."""
        current = minute_of(now if now is not None else time.time())
        wanted = list(range(current - minutes + 1, current + 1))
        if not settings.REDIS_DSN:
            return [(c[0], c[1], c[2]) for c in (self.minutes.get(m, (0, 0, 0)) for m in wanted)]
        from django_redis import get_redis_connection

        redis = get_redis_connection("default")
        pipe = redis.pipeline(transaction=False)
        for minute in wanted:
            pipe.hmget(f"{PREFIX}{minute}", "ok", "failed", "tokens")
        shared = pipe.execute()
        # Plus this process's counts of the last second, not yet in Redis.
        counts = []
        for minute, row in zip(wanted, shared, strict=True):
            ok, failed, tokens = (int(v or 0) for v in row)
            mine = self.unsent.get(minute, (0, 0, 0))
            counts.append((ok + mine[0], failed + mine[1], tokens + mine[2]))
        return counts


counters = LiveCounters()
