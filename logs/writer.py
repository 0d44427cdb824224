"""Writing request logs: a batch of attempts becomes log rows, hourly rollups (per group,
and per access key) and key counters, in one transaction.

The proxy collects `LogEntry` objects in memory and hands them over in batches (from one
writer thread, see `proxy.recorder`); everything written to the database happens here.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.db.models import F

from gptload.lib.providers.base import Usage
from keys.models import APIKey
from logs.models import AccessKeyHourlyStat, HourlyStat, RequestLog, RequestType

BODY_LIMIT = 65_000
ERROR_LIMIT = 65_000


@dataclass(slots=True)
class LogEntry:
    """One attempt, as the proxy saw it."""

    timestamp: float
    group_id: int
    group_name: str
    parent_group_id: int | None
    parent_group_name: str
    key_id: int | None
    key_stored: str
    key_hash: str
    model: str
    status: int
    error: str
    final: bool
    duration_ms: int
    source_ip: str
    request_path: str
    upstream: str
    stream: bool
    user_agent: str = ""
    request_body: str = ""
    usage: Usage | None = None
    # Nobody's fault (a client that left, a stream the upstream cut short): the key's
    # failure counter does not move, though the request did not succeed.
    blameless: bool = False
    access_key_id: int | None = None  # the client's access key, if it called with one

    @property
    def success(self) -> bool:
        return 200 <= self.status < 400 and not self.error

    def row(self, row_id: Any, timestamp: Any) -> tuple[Any, ...]:
        """The `RequestLog` columns of this attempt, in `COLUMNS` order."""
        usage = self.usage
        return (
            row_id, timestamp, self.group_id, self.group_name, self.parent_group_id,
            self.parent_group_name, self.key_stored, self.key_hash, self.model[:255],
            self.success, self.source_ip[:64], self.status, self.request_path[:500],
            max(0, self.duration_ms), self.error[:ERROR_LIMIT], self.user_agent[:512],
            RequestType.FINAL if self.final else RequestType.RETRY, self.upstream[:500],
            self.stream, self.request_body[:BODY_LIMIT],
            usage.prompt_tokens if usage else None, usage.completion_tokens if usage else None,
            usage.total_tokens if usage else None, self.access_key_id,
        )  # fmt: skip


# The field names `LogEntry.row()` fills, in its order (checked against the model).
COLUMNS = (
    "id", "timestamp", "group_id", "group_name", "parent_group_id", "parent_group_name",
    "key_value", "key_hash", "model", "is_success", "source_ip", "status_code",
    "request_path", "duration_ms", "error_message", "user_agent", "request_type",
    "upstream_addr", "is_stream", "request_body", "prompt_tokens", "completion_tokens",
    "total_tokens", "access_key_id",
)  # fmt: skip


def write_batch(entries: list[LogEntry]) -> None:
    """Log rows, key counters and hourly statistics of one batch, in one transaction."""
    try:
        _write_batch(entries)
    except Exception:
        connection.close()  # perhaps broken: the next batch opens a fresh one
        raise


Bucket = list[int]  # requests that succeeded, failed; prompt, completion, total tokens


def _write_batch(entries: list[LogEntry]) -> None:
    keys: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # successes, failures, last
    hours: dict[tuple[datetime, int, str], Bucket] = defaultdict(lambda: [0] * 5)
    clients: dict[tuple[datetime, int, int, str], Bucket] = defaultdict(lambda: [0] * 5)
    for entry in entries:
        if entry.key_id is not None and not (entry.blameless and not entry.success):
            used = keys[entry.key_id]
            used[0 if entry.success else 1] += 1
            used[2] = max(used[2], entry.timestamp)
        if entry.final:
            hour = datetime.fromtimestamp(entry.timestamp - entry.timestamp % 3600, UTC)
            model = entry.model[:255]
            for group_id in filter(None, (entry.group_id, entry.parent_group_id)):
                count(hours[(hour, group_id, model)], entry)
            if entry.access_key_id is not None:
                # One row per call: the group it named (the aggregate, if through one).
                named = entry.parent_group_id or entry.group_id
                count(clients[(hour, entry.access_key_id, named, model)], entry)
    with transaction.atomic():
        insert_logs(entries)
        APIKey.objects.count_use({k: (int(s), int(f), t) for k, (s, f, t) in keys.items()})
        for (hour, group_id, model), counts in hours.items():
            add_hourly(hour, group_id, model, counts)
        for (hour, access_key_id, group_id, model), counts in clients.items():
            add_access_hourly(hour, access_key_id, group_id, model, counts)


def count(bucket: Bucket, entry: LogEntry) -> None:
    """Adds a final attempt to an hourly bucket."""
    bucket[0 if entry.success else 1] += 1
    if (usage := entry.usage) is not None:
        bucket[2] += usage.prompt_tokens or 0
        bucket[3] += usage.completion_tokens or 0
        bucket[4] += usage.total_tokens or 0


def insert_logs(entries: list[LogEntry]) -> None:
    """`bulk_create` without its per-field machinery: one prepared INSERT, run many times.

    Rows are plain tuples; only the id and the timestamp need the backend's form, and
    both are made here in bulk. That makes a row several times cheaper to write, which
    matters: the web process writes one per proxied attempt.
    """
    with connection.cursor() as cursor:
        sql = insert_sql()
        ids = new_ids(len(entries))
        stamp = timestamp_adapter()
        rows = [entry.row(ids[n], stamp(entry.timestamp)) for n, entry in enumerate(entries)]
        for start in range(0, len(rows), 500):
            cursor.executemany(sql, rows[start : start + 500])


def insert_sql() -> str:
    meta = RequestLog._meta
    fields = {f.attname: f for f in meta.concrete_fields}
    if set(fields) != set(COLUMNS):  # a field added to the model must be added here
        raise RuntimeError(
            f"logs.writer.COLUMNS is out of date: {sorted(set(fields) ^ set(COLUMNS))}"
        )
    quote = connection.ops.quote_name
    columns = ", ".join(quote(fields[name].column) for name in COLUMNS)
    marks = ", ".join(["%s"] * len(COLUMNS))
    # Names from the model's own metadata, quoted; values go as parameters.
    return f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES ({marks})"  # noqa: S608


def new_ids(count: int) -> list[Any]:
    """Row ids as the backend stores a UUIDField (32 hex digits, or a uuid), time-ordered
    (RFC 9562's version 7: milliseconds first, then random bits).

    In time order, a new row goes at the end of the primary key's index instead of at a
    random place in it: a third less CPU per row on SQLite at 150k rows, and the page
    splits that random keys cause in MySQL's clustered index never happen.
    """
    prefix = (int(time.time() * 1000) & (1 << 48) - 1) << 80 | 0x7 << 76 | 0b10 << 62
    raw = os.urandom(10 * count)
    values = []
    for n in range(count):
        bits = int.from_bytes(raw[10 * n : 10 * n + 10], "big")
        values.append(prefix | (bits >> 68) << 64 | bits & (1 << 62) - 1)
    if connection.features.has_native_uuid_field:
        return [uuid.UUID(int=value) for value in values]
    return [f"{value:032x}" for value in values]


def timestamp_adapter() -> Callable[[float], Any]:
    """Unix seconds → the backend's form of an aware DateTimeField value (in UTC)."""
    if connection.vendor in ("sqlite", "mysql"):
        # What their `adapt_datetimefield_value` makes of it: naive UTC, as text.
        return lambda ts: str(datetime.fromtimestamp(ts, UTC).replace(tzinfo=None))
    adapt = connection.ops.adapt_datetimefield_value
    return lambda ts: adapt(datetime.fromtimestamp(ts, UTC))


def add_hourly(hour: datetime, group_id: int, model: str, counts: Bucket) -> None:
    add_to(HourlyStat, {"time": hour, "group_id": group_id, "model": model}, {
        "success_count": counts[0], "failure_count": counts[1], "prompt_tokens": counts[2],
        "completion_tokens": counts[3], "total_tokens": counts[4],
    })  # fmt: skip


def add_access_hourly(
    hour: datetime, access_key_id: int, group_id: int, model: str, counts: Bucket
) -> None:
    where = {"hour": hour, "access_key_id": access_key_id, "group_id": group_id, "model": model}
    add_to(AccessKeyHourlyStat, where, {
        "requests": counts[0] + counts[1], "failures": counts[1], "prompt_tokens": counts[2],
        "completion_tokens": counts[3], "total_tokens": counts[4],
    })  # fmt: skip


def add_to(
    model: type[HourlyStat] | type[AccessKeyHourlyStat],
    where: dict[str, Any],
    amounts: dict[str, int],
) -> None:
    """Adds `amounts` to the rollup row `where` names, creating it if it is the hour's first."""
    bucket = model.objects.filter(**where)
    if bucket.update(**{name: F(name) + amount for name, amount in amounts.items()}):
        return
    try:
        with transaction.atomic():  # another node may create the same hour at once
            model.objects.create(**where, **amounts)
    except IntegrityError:
        bucket.update(**{name: F(name) + amount for name, amount in amounts.items()})
