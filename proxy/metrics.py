"""The proxy's Prometheus metrics: counted per process in plain dicts, handed to
prometheus_client once a second.

Calling prometheus_client on each request costs 15-25 µs (a label lookup under a lock,
then a value, and with several web workers an mmap write, per instrument; measured with
three instruments), more than the rest of a call's own bookkeeping. So the pipeline adds
one to a dict entry and one to a histogram slot (`tally`, event loop thread only, about
a microsecond), and the runtime's once-a-second task (`proxy.runtime`) adds what
accumulated to the real instruments (`Tally.flush`). A scrape therefore sees each
process's counts at most a second late, which no Prometheus scrape interval notices.

With several web workers (`manage.py serve` sets `PROMETHEUS_MULTIPROC_DIR` when it
starts more than one), prometheus_client keeps each process's values in a file of that
directory and `/metrics` (`gptload.metrics`) sums them: whichever worker answers, it
tells the whole node. With one process the values stay in memory.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from logs.writer import LogEntry
from proxy.recorder import recorder

# No `_created` series: multiprocess mode has none, and a scrape looks the same with one
# web worker as with several.
disable_created_metrics()
# Not prometheus_client's global registry: the scrape shows these (and the database's
# figures) alike with one worker or several, without the per-process Python collectors.
REGISTRY = CollectorRegistry(auto_describe=True)
INF = math.inf
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, INF)  # fmt: skip
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, INF)  # fmt: skip
BUILD_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, INF)

requests = Counter(
    "gptload_requests",
    "Proxied requests, by the group named in the URL (empty when refused before one was "
    "known), its channel type, the status answered and the outcome (success, error: an "
    "upstream's failure, refused: answered by gptload itself, client_closed: 499).",
    ["group", "provider", "status", "outcome"],
    registry=REGISTRY,
)
retries = Counter(
    "gptload_retries",
    "Attempts that failed and were retried on another key, by the group named in the URL.",
    ["group"],
    registry=REGISTRY,
)
latency = Histogram(
    "gptload_request_duration_seconds",
    "Time from a proxied request's arrival to its end (a stream's last byte), by the group "
    "named in the URL and whether it streamed.",
    ["group", "stream"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
overhead = Histogram(
    "gptload_overhead_seconds",
    "Time a proxied request spent in gptload itself until its answer (a stream's headers) "
    "was handed to the server: its whole time minus the time spent waiting on upstreams "
    "(the x-gptload-overhead-ms header).",
    buckets=OVERHEAD_BUCKETS,
    registry=REGISTRY,
)
log_buffer = Gauge(
    "gptload_log_buffer_rows",
    "Request log rows waiting in memory for the database (all web workers).",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
log_dropped = Counter(
    "gptload_log_rows_dropped",
    "Request log rows dropped because the buffer was full (the database away too long).",
    registry=REGISTRY,
)
log_written = Counter(
    "gptload_log_rows_written", "Request log rows written to the database.", registry=REGISTRY
)
snapshot_build = Histogram(
    "gptload_snapshot_build_seconds",
    "Time to build the proxy's snapshot of groups, keys and settings: whole (at start, or "
    "after a gap in the change log) or catching up with the changes since the last one.",
    ["kind"],
    buckets=BUILD_BUCKETS,
    registry=REGISTRY,
)


def outcome(entry: LogEntry) -> str:
    if entry.success:
        return "success"
    if entry.status == 499:
        return "client_closed"
    if entry.key_id is None:
        return "refused"  # no key was tried: gptload answered by itself
    return "error"


def add_observations(child: Any, counts: Sequence[float]) -> None:
    """Adds a tally's bucket counts and sum (`counts[-1]`) to a histogram's child.

    prometheus_client's only public way in is `observe()`, one value at a time; its
    `_buckets` (one value per bucket, not cumulative) and `_sum` have kept their names
    and meaning since its first releases (`tests/test_metrics.py` checks the result).
    """
    for index, count in enumerate(counts[:-1]):
        if count:
            child._buckets[index].inc(count)
    child._sum.inc(counts[-1])


class Tally:
    """What this process counted since the last flush. Used from the event loop's thread
    only (the pipeline, the flush): no lock."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int, str], int] = {}
        self.retries: dict[str, int] = {}
        self.latency: dict[tuple[str, bool], list[float]] = {}
        self.overhead = [0.0] * (len(OVERHEAD_BUCKETS) + 1)
        self.dropped = 0  # recorder.dropped and .written as last flushed
        self.written = 0

    def ended(self, group: str, provider: str, entry: LogEntry, seconds: float) -> None:
        """A proxied request's final attempt ended (`seconds` after the request arrived)."""
        key = (group, provider, entry.status, outcome(entry))
        self.requests[key] = self.requests.get(key, 0) + 1
        counts = self.latency.get((group, entry.stream))
        if counts is None:
            counts = self.latency[(group, entry.stream)] = [0.0] * (len(LATENCY_BUCKETS) + 1)
        counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def refused(self, status: int) -> None:
        """A request refused before any group was known (bad key, no such group, too busy)."""
        key = ("", "", status, "refused")
        self.requests[key] = self.requests.get(key, 0) + 1

    def retried(self, group: str) -> None:
        self.retries[group] = self.retries.get(group, 0) + 1

    def spent(self, seconds: float) -> None:
        """gptload's own time on a request (`Call.overhead_ms`)."""
        self.overhead[bisect_left(OVERHEAD_BUCKETS, seconds)] += 1
        self.overhead[-1] += seconds

    def flush(self) -> None:
        """Adds what accumulated to the instruments; the log buffer's figures too."""
        counted, self.requests = self.requests, {}
        for (group, provider, status, result), count in counted.items():
            requests.labels(group, provider, str(status), result).inc(count)
        retried, self.retries = self.retries, {}
        for group, count in retried.items():
            retries.labels(group).inc(count)
        timed, self.latency = self.latency, {}
        for (group, stream), counts in timed.items():
            add_observations(latency.labels(group, "true" if stream else "false"), counts)
        spent, self.overhead = self.overhead, [0.0] * (len(OVERHEAD_BUCKETS) + 1)
        if any(spent[:-1]):
            add_observations(overhead, spent)
        log_buffer.set(len(recorder.buffer))
        dropped, written = recorder.dropped, recorder.written
        if dropped > self.dropped:
            log_dropped.inc(dropped - self.dropped)
        if written > self.written:
            log_written.inc(written - self.written)
        self.dropped, self.written = dropped, written


tally = Tally()
