"""Writing request logs: a batch of attempts becomes log rows, hourly rollups and key
counters, in one transaction.

The proxy collects `LogEntry` objects in memory and hands them over in batches (from one
writer thread, see `proxy.recorder`); everything written to the database happens here.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.db.models import F

from gptload.lib.providers.base import Usage
from keys.models import APIKey
from logs.models import HourlyStat, RequestLog, RequestType

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

    @property
    def success(self) -> bool:
        return 200 <= self.status < 400 and not self.error

    def values(self) -> dict[str, Any]:
        """The `RequestLog` fields of this attempt, by field name."""
        usage = self.usage
        return {
            "timestamp": datetime.fromtimestamp(self.timestamp, UTC),
            "group_id": self.group_id, "group_name": self.group_name,
            "parent_group_id": self.parent_group_id, "parent_group_name": self.parent_group_name,
            "key_value": self.key_stored, "key_hash": self.key_hash, "model": self.model[:255],
            "is_success": self.success, "source_ip": self.source_ip[:64], "status_code": self.status,
            "request_path": self.request_path[:500], "duration_ms": max(0, self.duration_ms),
            "error_message": self.error[:ERROR_LIMIT], "user_agent": self.user_agent[:512],
            "request_type": RequestType.FINAL if self.final else RequestType.RETRY,
            "upstream_addr": self.upstream[:500], "is_stream": self.stream,
            "request_body": self.request_body[:BODY_LIMIT],
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "total_tokens": usage.total_tokens if usage else None,
        }  # fmt: skip


def write_batch(entries: list[LogEntry]) -> None:
    """Log rows, key counters and hourly statistics of one batch, in one transaction."""
    try:
        _write_batch(entries)
    except Exception:
        connection.close()  # perhaps broken: the next batch opens a fresh one
        raise


def _write_batch(entries: list[LogEntry]) -> None:
    keys: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # successes, failures, last
    hours: dict[tuple[datetime, int, str], list[int]] = defaultdict(lambda: [0] * 5)
    for entry in entries:
        if entry.key_id is not None and not (entry.blameless and not entry.success):
            used = keys[entry.key_id]
            used[0 if entry.success else 1] += 1
            used[2] = max(used[2], entry.timestamp)
        if entry.final:
            hour = datetime.fromtimestamp(entry.timestamp - entry.timestamp % 3600, UTC)
            usage = entry.usage
            for group_id in filter(None, (entry.group_id, entry.parent_group_id)):
                bucket = hours[(hour, group_id, entry.model[:255])]
                bucket[0 if entry.success else 1] += 1
                if usage is not None:
                    bucket[2] += usage.prompt_tokens or 0
                    bucket[3] += usage.completion_tokens or 0
                    bucket[4] += usage.total_tokens or 0
    with transaction.atomic():
        insert_logs(entries)
        APIKey.objects.count_use({k: (int(s), int(f), t) for k, (s, f, t) in keys.items()})
        for (hour, group_id, model), counts in hours.items():
            add_hourly(hour, group_id, model, counts)


def insert_logs(entries: list[LogEntry]) -> None:
    """`bulk_create` without its per-field machinery: one prepared INSERT, run many times.

    Only the id and the timestamp need the backend's adaptation; every other value is a
    plain str, int, bool or None. This makes a row about five times cheaper to write,
    which matters: the web process writes one per proxied attempt.
    """
    meta = RequestLog._meta
    pk = meta.get_field("id")
    fields = [f for f in meta.concrete_fields if f is not pk]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(f.column) for f in [pk, *fields])
    marks = ", ".join(["%s"] * (len(fields) + 1))
    # Names from the model's own metadata, quoted; values go as parameters.
    sql = f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES ({marks})"  # noqa: S608
    adapt_time = connection.ops.adapt_datetimefield_value
    rows = []
    for entry in entries:
        values = entry.values()
        values["timestamp"] = adapt_time(values["timestamp"])
        row = [pk.get_db_prep_value(uuid.uuid4(), connection)]
        row.extend(values[f.attname] for f in fields)
        rows.append(row)
    with connection.cursor() as cursor:
        for start in range(0, len(rows), 500):
            cursor.executemany(sql, rows[start : start + 500])


def add_hourly(hour: datetime, group_id: int, model: str, counts: list[int]) -> None:
    increments = {
        "success_count": F("success_count") + counts[0],
        "failure_count": F("failure_count") + counts[1],
        "prompt_tokens": F("prompt_tokens") + counts[2],
        "completion_tokens": F("completion_tokens") + counts[3],
        "total_tokens": F("total_tokens") + counts[4],
    }
    bucket = HourlyStat.objects.filter(time=hour, group_id=group_id, model=model)
    if bucket.update(**increments):
        return
    try:
        with transaction.atomic():  # another node may create the same hour at once
            HourlyStat.objects.create(
                time=hour, group_id=group_id, model=model, success_count=counts[0],
                failure_count=counts[1], prompt_tokens=counts[2],
                completion_tokens=counts[3], total_tokens=counts[4],
            )  # fmt: skip
    except IntegrityError:
        bucket.update(**increments)
