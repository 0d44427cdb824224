"""The request log: every upstream attempt becomes a `RequestLog` row, off the hot path.

The pipeline appends an `Entry` to a bounded in-memory buffer (no I/O, no await); a
background task writes the buffer in batches every `request_log_write_interval_minutes`
(0: as soon as entries arrive), and whenever a full batch is waiting, so that memory
stays flat under load. The same batch updates the keys' counters and the hourly
statistics. When the database is away, entries wait in the buffer and are
written when it returns; beyond the bound the newest are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, connection, transaction
from django.db.models import F

from keys.models import APIKey
from logs.models import HourlyStat, RequestLog, RequestType

if TYPE_CHECKING:
    from proxy.providers.base import Usage

log = logging.getLogger("gptload.proxy")
BUFFER_LIMIT = 100_000
BATCH_SIZE = 1000
RETRY_SECONDS = 5.0
BODY_LIMIT = 65_000


@dataclass(slots=True)
class Entry:
    """One attempt, as the pipeline saw it."""

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
            "error_message": self.error, "user_agent": self.user_agent[:512],
            "request_type": RequestType.FINAL if self.final else RequestType.RETRY,
            "upstream_addr": self.upstream[:500], "is_stream": self.stream,
            "request_body": self.request_body[:BODY_LIMIT],
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "total_tokens": usage.total_tokens if usage else None,
        }  # fmt: skip


class Recorder:
    def __init__(self, limit: int = BUFFER_LIMIT) -> None:
        self.limit = limit
        self.buffer: list[Entry] = []
        self.dropped = 0
        self.written = 0
        self.writing = False
        self.interval = 60.0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._writer: ThreadPoolExecutor | None = None

    def record(self, entry: Entry) -> None:
        if len(self.buffer) >= self.limit:
            self.dropped += 1
            if self.dropped in (1, 100) or self.dropped % 10_000 == 0:
                log.warning("request log buffer full: %d entries dropped so far", self.dropped)
            return
        self.buffer.append(entry)
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(self._wake))
        if self.interval <= 0 or len(self.buffer) % BATCH_SIZE == 0:
            self._wake.set()  # a full batch goes now: memory stays flat under load

    def configure(self, interval_minutes: float) -> None:
        """Follows `request_log_write_interval_minutes`; a shorter interval applies now."""
        interval = max(0.0, float(interval_minutes) * 60)
        if interval < self.interval and self._wake is not None:
            self._wake.set()
        self.interval = interval

    async def _run(self, wake: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.interval
        while True:
            wait = max(0.0, due - loop.time()) if self.interval > 0 else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=wait)
            wake.clear()
            everything = self.interval <= 0 or loop.time() >= due
            if not await self.flush(everything):
                await asyncio.sleep(RETRY_SECONDS)
            elif everything:
                due = loop.time() + self.interval

    @property
    def idle(self) -> bool:
        return not self.buffer and not self.writing

    async def flush(self, everything: bool = True) -> bool:
        """Writes the buffer (or only its full batches) in batches; on failure the entries
        go back to wait. True when nothing failed."""
        while len(self.buffer) >= (1 if everything else BATCH_SIZE):
            batch, self.buffer = self.buffer[:BATCH_SIZE], self.buffer[BATCH_SIZE:]
            self.writing = True
            try:
                await asyncio.get_running_loop().run_in_executor(self.writer(), write_batch, batch)
            except Exception as exc:  # the database is away: keep the rows for later
                self.buffer[:0] = batch
                overflow = len(self.buffer) - self.limit
                if overflow > 0:
                    del self.buffer[self.limit :]
                    self.dropped += overflow
                log.warning("request logs not written yet (%s); %d waiting", exc, len(self.buffer))
                return False
            finally:
                self.writing = False
            self.written += len(batch)
        return True

    def writer(self) -> ThreadPoolExecutor:
        """One thread writes, on one database connection kept open between batches."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="gptload-log-writer")
            # The writer holds the GIL while it builds a batch; hand it back to the event
            # loop every millisecond rather than every five (CPython's default), so that a
            # write does not show up as a latency spike on requests in flight.
            sys.setswitchinterval(0.001)
        return self._writer

    def write_now(self) -> None:
        """Writes the buffer in this thread (at exit, where no event loop runs any more)."""
        while self.buffer:
            batch, self.buffer = self.buffer[:BATCH_SIZE], self.buffer[BATCH_SIZE:]
            try:
                write_batch(batch)
            except Exception:
                log.exception("%d request log rows not written", len(batch) + len(self.buffer))
                return
            self.written += len(batch)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task, self._wake = None, None
        await self.flush()


def write_batch(entries: list[Entry]) -> None:
    """Log rows, key counters and hourly statistics of one batch, in one transaction."""
    try:
        _write_batch(entries)
    except Exception:
        connection.close()  # perhaps broken: the next batch opens a fresh one
        raise


def _write_batch(entries: list[Entry]) -> None:
    keys: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # successes, failures, last
    hours: dict[tuple[datetime, int, str], list[int]] = defaultdict(lambda: [0] * 5)
    for entry in entries:
        if entry.key_id is not None and entry.status != 499:
            counts = keys[entry.key_id]
            counts[0 if entry.success else 1] += 1
            counts[2] = max(counts[2], int(entry.timestamp))
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
        for key_id, (successes, failures, last) in keys.items():
            APIKey.objects.filter(pk=key_id).update(
                request_count=F("request_count") + successes,
                failure_count=F("failure_count") + failures,
                last_used_at=datetime.fromtimestamp(last, UTC),
            )
        for (hour, group_id, model), counts in hours.items():
            add_hourly(hour, group_id, model, counts)


def insert_logs(entries: list[Entry]) -> None:
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


recorder = Recorder()
