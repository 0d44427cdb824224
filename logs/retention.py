"""Request log retention: old rows go in short batches, so a 10M-row table never locks.

Each batch is one DELETE of a range of the time index, in its own transaction (the task
holds none): its upper bound is the time of the `BATCH`-th oldest row, read off that
index alone. A DELETE by a list of ids looks each one up in the primary key; a range is
one walk along the index, and no statement carries thousands of parameters. Between
batches the proxy's log writer and the dashboard get the table (SQLite's one writer,
MariaDB's locks on the range).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from logs.models import AccessKeyHourlyStat, HourlyStat, RequestLog
from settings_app.models import SystemSetting

# Rows per DELETE, at first. Each row leaves nine B-trees (the table and its eight
# indexes): at 10 M rows on MariaDB with its default 128 MiB buffer pool, about 0.65 ms a
# row on a busy 2-core machine (2,000 rows took 1.3 s, 500 rows 185 / 349 ms p50 / p95).
# So each batch is sized from the last one's time, to take about `AIM` seconds, within
# `SMALLEST` and `LARGEST` rows: short on a loaded database, larger on a quick one.
BATCH = 500
AIM = 0.12
SMALLEST, LARGEST = 50, 5000


def prune_logs(now: datetime | None = None) -> dict[str, int]:
    """Deletes request logs older than `request_log_retention_days` (0: keep them all)
    and hourly statistics (per group and per access key) older than
    `STATS_RETENTION_DAYS`; returns the counts."""
    now = now or timezone.now()
    days = int(SystemSetting.objects.typed_values().get("request_log_retention_days", 7))
    logs = delete_before(RequestLog, "timestamp", now - timedelta(days=days)) if days else 0
    counts = {"request_logs": logs, "hourly_stats": 0, "access_key_hourly_stats": 0}
    if stats_days := settings.STATS_RETENTION_DAYS:
        cutoff = now - timedelta(days=stats_days)
        counts["hourly_stats"] = delete_before(HourlyStat, "time", cutoff)
        counts["access_key_hourly_stats"] = delete_before(AccessKeyHourlyStat, "hour", cutoff)
    return counts


Pruned = type[RequestLog] | type[HourlyStat] | type[AccessKeyHourlyStat]


def delete_before(model: Pruned, field: str, cutoff: datetime) -> int:
    """Deletes `model` rows whose `field` is before `cutoff`, a batch at a time."""
    deleted, size = 0, BATCH
    while True:
        began = time.perf_counter()
        batch = delete_batch(model, field, cutoff, size)
        deleted += batch
        if batch < size:  # that was the last of them
            return deleted
        took = max(time.perf_counter() - began, 0.001)
        size = next_size(size, took)


def next_size(size: int, took: float) -> int:
    """The next batch's rows, from how long `size` rows took: aimed at `AIM` seconds,
    growing at most twofold at a time."""
    return max(SMALLEST, min(LARGEST, size * 2, int(size * AIM / took)))


def delete_batch(model: Pruned, field: str, cutoff: datetime, size: int | None = None) -> int:
    """Deletes the oldest rows before `cutoff`: about `size` (`BATCH` by default; more
    only when rows share the last one's time). Returns how many; 0 when none is left."""
    size = size or BATCH
    old = model.objects.filter(**{f"{field}__lt": cutoff}).order_by(field)
    bounds = list(old.values_list(field, flat=True)[size - 1 : size])
    upto = {f"{field}__lte": bounds[0]} if bounds else {}
    with transaction.atomic():
        # A plain DELETE (`_raw_delete`): `delete()` would read the rows first to send
        # signals and cascade, neither of which these tables have.
        rows = model.objects.filter(**{f"{field}__lt": cutoff}, **upto)
        return rows._raw_delete(rows.db)
