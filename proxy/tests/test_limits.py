"""Access keys' counters (`proxy.limits`), in this process and in Redis: the same
arithmetic, windows and `Retry-After`, and in Redis counted once across nodes."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from django.conf import settings
from django.test import override_settings

from conftest import ON_REDIS
from proxy.limits import (
    DEFAULT_OUTPUT,
    LocalLimits,
    RedisLimits,
    Refusal,
    Ticket,
    calendar,
    redis_keys,
    reservation,
)


@dataclass
class Key:
    id: int
    rpm: int = 0
    tpm: int = 0
    daily_tokens: int = 0
    monthly_tokens: int = 0
    max_concurrency: int = 0

    @property
    def counts_tokens(self) -> bool:
        return bool(self.tpm or self.daily_tokens or self.monthly_tokens)


def test_a_reservation_is_the_prompt_and_the_output_bound():
    assert reservation({"max_tokens": 100}, 400) == 200
    assert reservation({"max_completion_tokens": 50}, 4) == 51
    assert reservation({"max_output_tokens": 7}, 0) == 7
    assert reservation({"generationConfig": {"maxOutputTokens": 30}}, 40) == 40
    assert reservation({"max_tokens": "lots"}, 0) == DEFAULT_OUTPUT
    assert reservation(None, 8) == 2 + DEFAULT_OUTPUT


@override_settings(TIME_ZONE="Asia/Shanghai")
def test_days_and_months_are_the_time_zones():
    zone = ZoneInfo("Asia/Shanghai")
    now = datetime(2026, 12, 31, 23, 59, 30, tzinfo=zone).timestamp()
    assert calendar(now) == ("20261231", 30, "202612", 30)
    now = datetime(2027, 2, 10, 12, 0, tzinfo=zone).timestamp()
    day, day_left, month, month_left = calendar(now)
    assert (day, day_left, month) == ("20270210", 12 * 3600, "202702")
    assert month_left == (18 * 24 + 12) * 3600


# In this process -----------------------------------------------------------------------------


def test_rpm_lets_the_first_calls_through_and_says_when_the_next_may_come():
    limits, key, now = LocalLimits(), Key(1, rpm=5), 1000.25
    taken = [limits.take(key, 0, now + i * 0.1) for i in range(8)]
    assert sum(isinstance(t, Ticket) for t in taken) == 5
    assert taken[5:] == [Refusal("rpm", 60)] * 3  # the first call's second leaves at 1060
    assert isinstance(limits.take(key, 0, 1060.0), Ticket)  # strict to the second


def test_tokens_are_reserved_then_settled_with_what_was_used():
    limits, key, now = LocalLimits(), Key(2, tpm=1000), 5000.0
    first, second = limits.take(key, 400, now), limits.take(key, 400, now)
    assert isinstance(first, Ticket)
    assert isinstance(second, Ticket)
    assert limits.take(key, 400, now + 1) == Refusal("tpm", 59)
    limits.settle(first, 100)  # it used less than it reserved
    third = limits.take(key, 400, now + 1)
    assert isinstance(third, Ticket)
    limits.settle(second, None)  # no usage reported: the reservation stands
    assert limits.take(key, 200, now + 2) == Refusal("tpm", 58)
    assert isinstance(limits.take(key, 100, now + 2), Ticket)


def test_a_call_bigger_than_the_minute_passes_alone_and_counts_whole_for_the_day():
    limits, key, now = LocalLimits(), Key(3, tpm=100, daily_tokens=1000), 7000.0
    big = limits.take(key, 500, now)
    assert isinstance(big, Ticket)
    assert limits.take(key, 1, now) == Refusal("tpm", 60)
    limits.settle(big, 950)
    refusal = limits.take(key, 60, now + 61)
    assert isinstance(refusal, Refusal)
    assert refusal.limit == "daily_tokens"
    assert refusal.retry_after == calendar(now + 61)[1]


def test_calls_in_flight_are_counted_until_settled_once():
    limits, key, now = LocalLimits(), Key(4, max_concurrency=2), 100.0
    first, second = limits.take(key, 0, now), limits.take(key, 0, now)
    assert limits.take(key, 0, now) == Refusal("max_concurrency", 1)
    assert isinstance(first, Ticket)
    limits.settle(first, None)
    limits.settle(first, None)  # twice: nothing more is freed
    assert isinstance(limits.take(key, 0, now), Ticket)
    assert limits.take(key, 0, now) == Refusal("max_concurrency", 1)
    assert isinstance(second, Ticket)


def test_the_refusal_is_the_limit_that_lasts_longest():
    limits, key, now = LocalLimits(), Key(5, rpm=1, monthly_tokens=10), 100.0
    assert isinstance(limits.take(key, 10, now), Ticket)
    refusal = limits.take(key, 10, now)
    assert isinstance(refusal, Refusal)
    assert refusal.limit == "monthly_tokens"


# In Redis ------------------------------------------------------------------------------------

needs_redis = pytest.mark.skipif(not ON_REDIS, reason="Redis counters run on the Redis pass")


@pytest.fixture
async def nodes():
    """Two nodes' counters on the pass's Redis, each with its own connection."""
    import redis.asyncio as aioredis

    clients = [aioredis.from_url(settings.REDIS_DSN) for _ in range(2)]
    yield [RedisLimits(client, LocalLimits()) for client in clients]
    for client in clients:
        await client.aclose()


def fresh_key(**limits: int) -> Key:
    return Key(random.randrange(10**9, 10**10), **limits)


@needs_redis
async def test_in_redis_two_nodes_count_an_rpm_once(nodes):
    key = fresh_key(rpm=5)
    now = time.time()
    taken = await asyncio.gather(*(nodes[i % 2].take(key, 0, now) for i in range(8)))
    assert sum(isinstance(t, Ticket) for t in taken) == 5
    refusals = [t for t in taken if isinstance(t, Refusal)]
    assert {r.limit for r in refusals} == {"rpm"}
    assert all(58 <= r.retry_after <= 60 for r in refusals)


@needs_redis
async def test_in_redis_tokens_are_reserved_and_settled_across_nodes(nodes):
    key = fresh_key(tpm=1000, daily_tokens=5000)
    now = time.time()
    first = await nodes[0].take(key, 400, now)
    second = await nodes[1].take(key, 400, now)
    assert isinstance(first, Ticket)
    assert isinstance(second, Ticket)
    refused = await nodes[0].take(key, 400, now)
    assert isinstance(refused, Refusal)
    assert refused.limit == "tpm"
    await nodes[1].settle(first, 100)
    assert isinstance(await nodes[0].take(key, 400, now), Ticket)
    client = nodes[0].redis
    day = redis_keys(nodes[0].prefix, key.id, first.day, first.month)[2]
    assert int(await client.get(day)) == 400 + 400 + 400 - 300
    assert 0 < await client.ttl(day) <= calendar(now)[1] + 3600


@needs_redis
async def test_in_redis_slots_in_flight_are_freed_by_whichever_node_settles(nodes):
    key = fresh_key(max_concurrency=1)
    now = time.time()
    ticket = await nodes[0].take(key, 0, now)
    assert isinstance(ticket, Ticket)
    assert await nodes[1].take(key, 0, now) == Refusal("max_concurrency", 1)
    await nodes[1].settle(ticket, None)
    assert isinstance(await nodes[1].take(key, 0, now), Ticket)


@needs_redis
async def test_without_redis_a_node_counts_on_its_own_and_settles_there():
    import redis.asyncio as aioredis

    gone = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    node = RedisLimits(gone, LocalLimits())
    key = fresh_key(rpm=1)
    ticket = await node.take(key, 0, time.time())
    assert isinstance(ticket, Ticket)
    assert node.failing
    refusal = await node.take(key, 0, time.time())
    assert isinstance(refusal, Refusal)
    await node.settle(ticket, None)
    await gone.aclose()
