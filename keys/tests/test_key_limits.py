"""Upstream keys kept under their limits, in memory: the providers' announced limits
(`announced_rest`), the per-key caps counted in-process (`keys.caps`), and the pool's
holds and waiters. Served through the real SDKs: `proxy/tests/test_key_limits.py`."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime

import pytest

from keys.caps import RECHECK, KeyCaps, LocalCounts, SlidingCount
from keys.models import KeyStatus
from keys.states import (
    ANNOUNCED_REST,
    LONGEST_REST,
    KeyEntry,
    KeyPool,
    KeyStates,
    announced_rest,
    parse_duration,
    wait_for_key,
)

NOW = 1_700_000_000.0


def rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def entry(key_id: int = 1) -> KeyEntry:
    return KeyEntry(key_id, 1, f"k{key_id}", f"h{key_id}", f"k{key_id}")


# Announced limits ------------------------------------------------------------------------


def test_answers_without_rate_limit_headers_rest_nothing():
    assert announced_rest({"content-type": "application/json"}, NOW) is None
    assert announced_rest({}) is None


def test_no_request_left_rests_the_key_until_the_announced_reset():
    headers = {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0",
               "x-ratelimit-reset-requests": "1.5s", "x-ratelimit-remaining-tokens": "29000",
               "x-ratelimit-limit-tokens": "30000", "x-ratelimit-reset-tokens": "20ms"}  # fmt: skip
    until, reason = announced_rest(headers, NOW)  # type: ignore[misc]
    assert until == NOW + 1.5
    at = time.strftime("%H:%M:%S", time.gmtime(NOW + 1.5))
    assert reason == f"rate limit announced: 0 requests left until {at} UTC"


def test_some_requests_left_rest_nothing():
    assert announced_rest({"x-ratelimit-remaining-requests": "1",
                           "x-ratelimit-reset-requests": "1s"}, NOW) is None  # fmt: skip


@pytest.mark.parametrize(
    ("remaining", "limit", "rests"),
    [("299", "30000", True), ("300", "30000", False), ("999", None, True), ("1000", None, False)],
)
def test_tokens_rest_the_key_below_one_percent_of_the_limit_or_a_floor(remaining, limit, rests):
    headers = {"x-ratelimit-remaining-tokens": remaining, "x-ratelimit-reset-tokens": "6m0s"}
    if limit:
        headers["x-ratelimit-limit-tokens"] = limit
    found = announced_rest(headers, NOW)
    assert (found is not None) == rests
    if found:
        assert found[0] == NOW + 360
        assert f"{remaining} of {limit} tokens left" in found[1] if limit else True


def test_the_latest_reset_of_the_limits_that_ran_out_counts():
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s",
               "x-ratelimit-remaining-tokens": "0", "x-ratelimit-limit-tokens": "100",
               "x-ratelimit-reset-tokens": "1h2m3.5s"}  # fmt: skip
    until, reason = announced_rest(headers, NOW)  # type: ignore[misc]
    assert until == NOW + 3723.5
    assert "0 of 100 tokens left" in reason


def test_a_reset_that_cannot_be_read_rests_briefly_and_a_far_one_at_most_a_day():
    unreadable = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "soon"}
    assert announced_rest(unreadable, NOW)[0] == NOW + ANNOUNCED_REST  # type: ignore[index]
    far = {"anthropic-ratelimit-requests-remaining": "0",
           "anthropic-ratelimit-requests-reset": rfc3339(NOW + 9 * 86400)}  # fmt: skip
    assert announced_rest(far, NOW)[0] == NOW + LONGEST_REST  # type: ignore[index]


def test_unreadable_counts_are_ignored():
    assert announced_rest({"x-ratelimit-remaining-requests": "many"}, NOW) is None
    assert announced_rest({"anthropic-ratelimit-tokens-remaining": ""}, NOW) is None


@pytest.mark.parametrize("kind", ["requests", "tokens", "input-tokens", "output-tokens"])
def test_anthropics_headers_rest_the_key_until_their_rfc3339_reset(kind):
    low = "0" if kind == "requests" else "9"
    headers = {f"anthropic-ratelimit-{kind}-remaining": low,
               f"anthropic-ratelimit-{kind}-limit": "1000",
               f"anthropic-ratelimit-{kind}-reset": rfc3339(NOW + 30)}  # fmt: skip
    until, reason = announced_rest(headers, NOW)  # type: ignore[misc]
    assert until == NOW + 30
    assert f"{kind.replace('-', ' ')} left until" in reason
    headers[f"anthropic-ratelimit-{kind}-remaining"] = "500"
    assert announced_rest(headers, NOW) is None


def test_durations_below_a_second_keep_their_value_for_announced_resets():
    assert parse_duration("20ms", floor=0.0) == 0.02
    assert parse_duration("20ms") == 1.0  # a 429's cooldown keeps its floor


def test_an_announced_rest_cools_the_key_without_counting_a_failure():
    states, key = KeyStates(), entry()
    key.consecutive_failures = 1
    pool = KeyPool([key])
    until = time.time() + 30
    states.rest(pool, key, until, "rate limit announced: 0 requests left until …")
    assert (key.status, key.cooling_until, key.consecutive_failures) == (
        KeyStatus.COOLING, until, 1)  # fmt: skip
    assert pool.pick(time.time()) is None
    assert states.errors[key.id].startswith("rate limit announced")
    states.succeeded(key)  # the call whose answer announced it ends well: the rest stands
    assert (key.status, key.consecutive_failures) == (KeyStatus.COOLING, 0)
    states.rest(pool, key, until - 10, "earlier")  # an earlier end never shortens it
    assert key.cooling_until == until


def test_an_invalid_key_is_not_rested():
    states, key = KeyStates(), entry()
    key.status = KeyStatus.INVALID
    states.rest(KeyPool([key]), key, time.time() + 30, "x")
    assert key.status == KeyStatus.INVALID


# Caps counted in-process -----------------------------------------------------------------


def test_a_minute_cap_admits_n_calls_then_says_when_there_is_room():
    counts, caps = LocalCounts(), KeyCaps(rpm=3, rpd=0, concurrency=0)
    first = counts.admit(1, caps, NOW)
    assert (first.admitted, first.wait) == (True, 0.0)
    assert counts.admit(1, caps, NOW + 10).admitted
    third = counts.admit(1, caps, NOW + 20)
    assert third.admitted
    assert 40 < third.wait <= 42
    refused = counts.admit(1, caps, NOW + 30)
    assert not refused.admitted
    assert 30 < refused.wait <= 32
    assert refused.reason == "key_rpm: 3 calls in the last minute"
    assert counts.admit(2, caps, NOW + 30).admitted  # another key counts on its own
    assert counts.admit(1, caps, NOW + 30 + refused.wait).admitted


def test_no_window_long_span_ever_holds_more_than_the_cap():
    counts, caps = LocalCounts(), KeyCaps(rpm=5, rpd=0, concurrency=0)
    rng = random.Random(7)
    at, admitted = NOW, []
    for _ in range(3000):
        at += rng.expovariate(1 / 4)
        if counts.admit(1, caps, at).admitted:
            admitted.append(at)
    assert len(admitted) > 300
    for i, start in enumerate(admitted):
        assert sum(1 for t in admitted[i:i + 6] if t - start < 60) <= 5  # fmt: skip


def test_a_day_cap_counts_a_day():
    counts, caps = LocalCounts(), KeyCaps(rpm=0, rpd=2, concurrency=0)
    assert counts.admit(1, caps, NOW).admitted
    assert counts.admit(1, caps, NOW + 3600).admitted
    refused = counts.admit(1, caps, NOW + 7200)
    assert not refused.admitted
    assert 86400 - 7200 < refused.wait <= 86400 - 7200 + 1440
    assert refused.reason == "key_rpd: 2 calls in the last day"


def test_concurrency_slots_are_taken_and_given_back():
    counts, caps = LocalCounts(), KeyCaps(rpm=0, rpd=0, concurrency=2)
    assert counts.admit(1, caps, NOW).wait == 0.0
    second = counts.admit(1, caps, NOW)
    assert second.admitted
    assert second.wait == RECHECK
    refused = counts.admit(1, caps, NOW)
    assert not refused.admitted
    assert refused.reason == "key_max_concurrency: 2 calls in flight"
    counts.release(1)
    assert counts.admit(1, caps, NOW).admitted
    counts.release(1)
    counts.release(1)
    assert counts.inflight == {}


def test_a_sliding_count_forgets_slices_older_than_its_window():
    window = SlidingCount(60)
    window.add(NOW)
    window.add(NOW + 59)
    assert window.count(NOW + 59) == 2
    assert window.count(NOW + 62) == 1


def test_caps_are_read_from_the_settings():
    assert KeyCaps.of({"key_rpm": 0, "key_rpd": 0, "key_max_concurrency": 0}) is None
    assert KeyCaps.of({"key_rpm": 5, "key_rpd": 0, "key_max_concurrency": 2}) == KeyCaps(5, 0, 2)


# Holds and waiters ------------------------------------------------------------------------


def test_a_held_key_leaves_the_rotation_until_its_time_or_an_early_release():
    one, two = entry(1), entry(2)
    pool = KeyPool([one, two])
    now = time.time()
    pool.hold(one, now + 5, now)
    assert {pool.pick(now).id for _ in range(4)} == {2}  # type: ignore[union-attr]
    assert one.status == KeyStatus.ACTIVE  # a hold is no state: never stored nor shared
    pool.hold(two, now + 3, now)
    assert pool.pick(now) is None
    assert pool.next_ready_in(now) == pytest.approx(3)
    assert pool.pick(now + 3.01) is two
    pool.unhold(one, now)
    assert {pool.pick(now).id for _ in range(4)} == {1, 2}  # type: ignore[union-attr]


def test_a_cooling_key_that_is_also_held_comes_back_at_the_later_time():
    key = entry()
    pool = KeyPool([key])
    now = time.time()
    key.status, key.cooling_until = KeyStatus.COOLING, now + 2
    pool.place(key, now)
    pool.hold(key, now + 4, now)
    assert pool.next_ready_in(now) == pytest.approx(4)
    assert pool.pick(now + 3) is None
    assert pool.pick(now + 4.01) is key


async def test_a_waiter_is_woken_when_a_key_comes_back_and_not_before():
    key = entry()
    pool = KeyPool([key])
    now = time.time()
    pool.hold(key, now + 60, now)
    waiting = asyncio.create_task(wait_for_key([pool], 30))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    pool.unhold(key, time.time())
    await asyncio.wait_for(waiting, 1)
    assert not pool.waiters


async def test_a_wait_ends_at_its_time_and_leaves_nothing_behind():
    pool = KeyPool([])
    began = time.monotonic()
    await wait_for_key([pool], 0.1)
    assert 0.09 < time.monotonic() - began < 1
    assert not pool.waiters
