"""The request log buffer: every upstream attempt is kept here until `logs` writes it.

The pipeline appends a `LogEntry` to a bounded in-memory buffer (no I/O, no await); a
background task hands the buffer to `logs.writer.write_batch` (rows, hourly rollups,
key counters), on one writer thread, every `request_log_write_interval_minutes` (0: as
soon as entries arrive) and whenever a full batch is waiting, so that memory stays flat
under load. When the database is away, entries wait in the buffer and are written when
it returns; beyond the bound the newest are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

from logs import live
from logs.writer import LogEntry, write_batch

log = logging.getLogger("gptload.proxy")
BUFFER_LIMIT = 100_000
BATCH_SIZE = 1000
RETRY_SECONDS = 5.0


class Recorder:
    def __init__(self, limit: int = BUFFER_LIMIT) -> None:
        self.limit = limit
        self.buffer: list[LogEntry] = []
        self.dropped = 0
        self.written = 0
        self.writing = False
        self.interval = 60.0
        self._minutes: float = 1.0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._writer: ThreadPoolExecutor | None = None

    def record(self, entry: LogEntry) -> None:
        if entry.final:
            usage = entry.usage
            live.counters.note(entry.timestamp, entry.success,
                               (usage.total_tokens or 0) if usage else 0)  # fmt: skip
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
        if interval_minutes == self._minutes:
            return
        self._minutes = interval_minutes
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


recorder = Recorder()
