"""Bulk key jobs (import, delete, validate): start, run, report progress, describe.

A `KeyJob` row is the whole state of a job. The API creates it and queues
`keys.tasks.run_job` for a Celery worker; a `manage.py` command creates it and runs it
in its own process. Either way the row holds the group (one unfinished job per group,
enforced by a unique index), the progress (stored at most every `PROGRESS_INTERVAL`
by a heartbeat thread), and the outcome, so every node shows the same status and it
survives restarts. A job whose heartbeat stops (its worker died) is marked failed when
someone next looks, which frees its group.

A refusal raised to a caller (`JobInProgress`, `JobNotQueued`) is in the caller's
language; what is stored on the row (`error`) stays English, since every node and every
operator, whatever their language, reads the same row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any

from celery import current_app
from django.db import IntegrityError, connections, transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, gettext_noop

from gptload.lib import heartbeat
from gptload.lib.crypto import DecryptionError, current_cipher
from keys import checker, services
from keys.models import Group, JobKind, JobStatus, KeyJob, KeyJobPart, KeyStatus

log = logging.getLogger("gptload.jobs")
PROGRESS_INTERVAL = 0.5  # seconds between progress writes
HEARTBEAT_INTERVAL = 15.0  # seconds between writes when progress does not move
RUNNING_STALE_AFTER = timedelta(minutes=2)
PENDING_STALE_AFTER = timedelta(hours=1)
KEEP_FINISHED = 20  # finished jobs kept per group
PART_KEYS = 10_000  # keys per stored part of an upload (about 0.5 MiB of text)
RUN_JOB_TASK = "keys.tasks.run_job"
TASK_TYPES = {JobKind.IMPORT: "KEY_IMPORT", JobKind.DELETE: "KEY_DELETE",
              JobKind.VALIDATE: "KEY_VALIDATION"}  # fmt: skip
VALIDATABLE = (KeyStatus.ACTIVE, KeyStatus.COOLING, KeyStatus.INVALID)
# What a refusal calls a running job, in the caller's language.
KIND_NAMES = {JobKind.IMPORT: gettext_lazy("import keys"), JobKind.DELETE: gettext_lazy("delete keys"),
              JobKind.VALIDATE: gettext_lazy("validate keys")}  # fmt: skip


class JobInProgress(Exception):
    """The group already has an unfinished job (GPT-Load's 409 TASK_IN_PROGRESS)."""


class JobNotQueued(Exception):
    """The job could not be handed to a worker (the broker is unreachable)."""


class JobAbandoned(Exception):
    """The job was cancelled or given up while it ran; its work stops."""


# Refusals whose message is the whole story (no traceback in the log).
EXPECTED = (services.KeyOperationError, checker.CheckError, JobAbandoned, JobInProgress)


def create(
    group: Group,
    kind: JobKind,
    *,
    keys: Sequence[str] = (),
    params: dict[str, Any] | None = None,
    running: bool = False,
) -> KeyJob:
    """A new job for `group`, pending (for a worker) or already `running` (here).

    `keys` is stored encrypted in the row for a worker to read. Raises
    `JobInProgress` when the group has an unfinished job, `KeyOperationError` when the
    key list is too big for one job.
    """
    services.ensure_holds_keys(group)
    payload = current_cipher().encrypt("\n".join(keys)) if keys and not running else ""
    limit = payload_limit()
    if limit is not None and len(payload) > limit:
        raise services.KeyTextError(
            _(
                "The key list takes %(size).1f MiB stored; the database takes %(limit).1f MiB "
                "at most in one statement (MySQL's max_allowed_packet). Split it, raise "
                "max_allowed_packet, or import it with `manage.py import_keys`."
            )
            % {"size": len(payload) / 2**20, "limit": limit / 2**20}
        )
    abandon_stale(group.pk)
    now = timezone.now()
    try:
        with transaction.atomic():
            job = KeyJob.objects.create(
                group=group,
                kind=kind,
                running_group_id=group.pk,
                status=JobStatus.RUNNING if running else JobStatus.PENDING,
                started_at=now if running else None,
                params=params or {},
                payload=payload,
                total=len(keys),
            )
    except IntegrityError:
        raise JobInProgress(_busy_message(group)) from None
    _prune(group)
    return job


def payload_limit() -> int | None:
    """The largest key list (as stored) a job row takes, or None for no limit of ours.

    MySQL and MariaDB refuse a statement beyond `max_allowed_packet` (16 MiB by default
    on MariaDB); a margin is left for the rest of the INSERT.
    """
    connection = connections[KeyJob.objects.db]
    if connection.vendor != "mysql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@max_allowed_packet")
        row = cursor.fetchone()
    return max(int(row[0]) - 2**20, 2**20) if row else None


def start(
    group: Group, kind: JobKind, *, keys: Sequence[str] = (), params: dict[str, Any] | None = None
) -> KeyJob:
    """Creates a job and queues it for a Celery worker once the row is committed.

    Raises `JobInProgress`, `KeyOperationError`, or `JobNotQueued` (the job is then
    recorded as failed).
    """
    job = create(group, kind, keys=keys, params=params)
    transaction.on_commit(lambda: _enqueue(job))
    return job


def start_import(group: Group, texts: Iterable[str]) -> KeyJob:
    """Creates an import job from key text that arrives in pieces (an upload read a chunk
    at a time) and queues it once every key is stored.

    The group is claimed first (`JobInProgress` before a byte is read); each `PART_KEYS`
    keys are stored encrypted as soon as they are read, a short INSERT each, so no
    process holds the whole list. Text that `parse_keys` would refuse (no key, a
    malformed one) raises `KeyTextError` and leaves nothing behind, nor does any other
    failure. Raises `JobNotQueued` as `start` does.
    """
    job = create(group, JobKind.IMPORT)
    try:
        reader, waiting, number = services.KeyReader(), [], 0
        for text in texts:
            waiting += reader.feed(text)
            while len(waiting) >= PART_KEYS:
                _store_part(job, number, waiting[:PART_KEYS])
                waiting, number = waiting[PART_KEYS:], number + 1
        waiting += reader.close()
        reader.check()
        for part in services.chunks(waiting, PART_KEYS):
            _store_part(job, number, part)
            number += 1
        job.total = reader.count
        KeyJob.objects.filter(pk=job.pk).update(total=job.total, updated_at=timezone.now())
    except BaseException:
        KeyJob.objects.filter(pk=job.pk).delete()  # its parts with it
        raise
    transaction.on_commit(lambda: _enqueue(job))
    return job


def _store_part(job: KeyJob, number: int, keys: Sequence[str]) -> None:
    text = current_cipher().encrypt("\n".join(keys))
    KeyJobPart.objects.create(job=job, number=number, keys=text)


def _enqueue(job: KeyJob) -> None:
    try:
        # By name: `keys.tasks` is the shell around this module, which never imports it.
        current_app.send_task(RUN_JOB_TASK, args=[job.pk])
    except Exception as exc:  # the broker: Redis down, a full disk under data/
        log.warning("could not queue key job %s: %s", job.pk, exc, exc_info=True)
        _finish(job.pk, JobStatus.FAILED, error=f"could not be queued: {exc}")
        raise JobNotQueued(
            _(
                "The job could not be queued for a worker (is the Celery broker reachable?): %(error)s"
            )
            % {"error": exc}
        ) from exc


def run(job_id: int) -> None:
    """Runs a pending job to its end (the Celery task's body); a failure is recorded on
    the job's row, not raised."""
    now = timezone.now()
    if not KeyJob.objects.filter(pk=job_id, status=JobStatus.PENDING, finished_at=None).update(
        status=JobStatus.RUNNING, started_at=now, updated_at=now
    ):
        log.info("key job %s is not pending any more (cancelled, given up or run)", job_id)
        return
    job = KeyJob.objects.select_related("group").filter(pk=job_id).first()
    if job is None:
        return  # its group was deleted meanwhile
    try:
        execute(job, _job_keys(job))
    except Exception as exc:
        if not isinstance(exc, EXPECTED):
            log.exception("key job %s (%s of group %s) failed", job.pk, job.kind, job.group.name)
        _finish(job.pk, JobStatus.FAILED, error=describe_error(exc))


def run_here(
    group: Group,
    kind: JobKind,
    *,
    keys: Sequence[str] = (),
    params: dict[str, Any] | None = None,
    echo: services.Progress | None = None,
) -> dict[str, Any]:
    """Runs a job in this process (a command), visible to the API like any other.

    Returns the job's result; raises `JobInProgress`, and whatever stopped the job
    (recorded on the row first).
    """
    job = create(group, kind, keys=keys, params=params, running=True)
    try:
        return execute(job, keys, echo)
    except BaseException as exc:  # Ctrl-C too: the group must not stay locked
        _finish(job.pk, JobStatus.FAILED, error=describe_error(exc))
        raise


def execute(
    job: KeyJob, keys: Iterable[str], echo: services.Progress | None = None
) -> dict[str, Any]:
    """Does a running job's work and records its result."""
    with Heartbeat(job.pk, job.total, echo) as progress:
        if job.kind == JobKind.IMPORT:
            result: dict[str, Any] = services.import_keys(job.group, keys, progress, job.total)
        elif job.kind == JobKind.DELETE:
            result = services.delete_keys(job.group, list(keys), progress)
        else:
            statuses = job.params.get("statuses") or list(VALIDATABLE)
            key_ids = job.params.get("key_ids")  # chosen keys (the console's selection)
            result = dict(checker.validate_keys(job.group, statuses=statuses, key_ids=key_ids,
                                                progress=progress))  # fmt: skip
        progress.check()
    _finish(job.pk, JobStatus.SUCCEEDED, result=result, processed=progress.processed,
            total=progress.total)  # fmt: skip
    return result


def cancel(job: KeyJob) -> bool:
    """Marks an unfinished job failed; its worker stops at its next progress report."""
    return _finish(job.pk, JobStatus.FAILED, error="cancelled by the operator")


def abandon_stale(group_id: int | None = None) -> int:
    """Marks failed the jobs whose worker stopped reporting (or that no worker took)."""
    now = timezone.now()
    rows = KeyJob.objects.filter(finished_at=None)
    if group_id is not None:
        rows = rows.filter(group_id=group_id)
    given_up = 0
    for status, after, reason in (
        (JobStatus.RUNNING, RUNNING_STALE_AFTER,
         "stopped reporting progress: the process running it ended. Start it again."),
        (JobStatus.PENDING, PENDING_STALE_AFTER,
         "no worker took it within an hour: is the Celery worker running?"),
    ):  # fmt: skip
        stale = rows.filter(status=status, updated_at__lt=now - after)
        if not stale.exists():  # the usual answer, without taking SQLite's write lock
            continue
        ids = list(stale.values_list("id", flat=True))
        given_up += KeyJob.objects.filter(pk__in=ids, finished_at=None).update(
            status=JobStatus.FAILED, error=reason, finished_at=now, updated_at=now,
            running_group_id=None, payload="")  # fmt: skip
        KeyJobPart.objects.filter(job_id__in=ids).delete()
    return given_up


def describe(job: KeyJob | None) -> dict[str, Any]:
    """GPT-Load's task status for a job (idle values when there is none)."""
    if job is None:
        return {"id": None, "task_type": "", "kind": "", "status": "", "is_running": False,
                "group_id": None, "group_name": "", "processed": 0, "total": 0, "result": None,
                "error": "", "created_at": None, "started_at": None, "finished_at": None,
                "duration_seconds": 0.0, "waiting_for_worker": False, "note": ""}  # fmt: skip
    end = job.finished_at or timezone.now()
    duration = (end - job.started_at).total_seconds() if job.started_at else 0.0
    waiting = job.status == JobStatus.PENDING and not worker_alive()
    return {
        "id": job.pk,
        "task_type": TASK_TYPES[JobKind(job.kind)],
        "kind": job.kind,
        "status": job.status,
        "is_running": job.is_running,
        "group_id": job.group_id,
        "group_name": job.group.name,
        "processed": job.processed,
        "total": job.total,
        "result": job.result,
        "error": job.error,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "duration_seconds": round(max(duration, 0.0), 3),
        # Pending with no worker heard from lately: it will not start by itself.
        "waiting_for_worker": waiting,
        "note": _(NO_WORKER) if waiting else "",
    }


NO_WORKER = gettext_noop(
    "Waiting for a worker: no Celery worker has been seen for a few "
    "minutes. Start one (celery -A gptload worker; make run embeds one)."
)


def worker_alive() -> bool:
    """Whether a Celery worker noted it was alive lately (its heartbeat)."""
    return heartbeat.background()[heartbeat.WORKER].alive


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, EXPECTED):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {exc}"[:2000]


class Heartbeat:
    """The progress callback of a job: callable from any thread (or event loop), it only
    records numbers; a thread of its own stores them on the row at most every
    `PROGRESS_INTERVAL`, and every `HEARTBEAT_INTERVAL` even when they stand still."""

    def __init__(self, job_id: int, total: int = 0, echo: services.Progress | None = None) -> None:
        self.job_id, self.echo = job_id, echo
        self.processed, self.total = 0, total
        self.abandoned = False
        self._stored: tuple[int, int] | None = None
        self._stored_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"keyjob-{job_id}", daemon=True)

    def __call__(self, processed: int, total: int) -> None:
        self.check()
        with self._lock:
            self.processed, self.total = processed, total
        if self.echo is not None:
            self.echo(processed, total)

    def check(self) -> None:
        if self.abandoned:
            raise JobAbandoned("the job was cancelled or given up while it ran")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        try:
            while not self._stop.wait(PROGRESS_INTERVAL):
                self._store()
        finally:
            connections.close_all()  # this thread's own connections

    def _store(self) -> None:
        with self._lock:
            numbers = (self.processed, self.total)
        quiet_for = time.monotonic() - self._stored_at
        if numbers == self._stored and quiet_for < HEARTBEAT_INTERVAL:
            return
        try:
            alive = KeyJob.objects.filter(pk=self.job_id, finished_at=None).update(
                processed=numbers[0], total=numbers[1], updated_at=timezone.now()
            )
        except Exception as exc:  # a busy database: the next beat tries again
            log.warning("could not store the progress of key job %s: %s", self.job_id, exc)
            return
        self._stored, self._stored_at = numbers, time.monotonic()
        self.abandoned = not alive


def _finish(
    job_id: int,
    status: JobStatus,
    *,
    result: dict[str, Any] | None = None,
    error: str = "",
    processed: int | None = None,
    total: int | None = None,
) -> bool:
    now = timezone.now()
    fields: dict[str, Any] = {"status": status, "result": result, "error": error,
                              "finished_at": now, "updated_at": now,
                              "running_group_id": None, "payload": ""}  # fmt: skip
    if processed is not None:
        fields["processed"] = processed
    if total is not None:
        fields["total"] = total
    finished = bool(KeyJob.objects.filter(pk=job_id, finished_at=None).update(**fields))
    KeyJobPart.objects.filter(job_id=job_id).delete()  # the keys do not linger
    return finished


def _job_keys(job: KeyJob) -> Iterator[str]:
    """The job's key list: from its row, or part by part (an upload), one part in memory."""
    texts: Iterable[str] = [job.payload] if job.payload else (
        part.keys for part in _parts(job.pk))  # fmt: skip
    for text in texts:
        try:
            yield from current_cipher().decrypt(text).split("\n")
        except DecryptionError:
            raise services.KeyOperationError(
                "The job's key list was stored under another ENCRYPTION_KEY; send it again."
            ) from None


def _parts(job_id: int) -> Iterator[KeyJobPart]:
    after = -1
    while (
        part := KeyJobPart.objects.filter(job_id=job_id, number__gt=after)
        .order_by("number")
        .first()
    ):
        yield part
        after = part.number


def _busy_message(group: Group) -> str:
    job = KeyJob.objects.filter(group=group, finished_at=None).first()
    if job is None:
        return _("a job is already running for this group")
    return _(
        "a job is already running for this group (%(kind)s #%(id)d, %(processed)d/%(total)d); "
        "wait for it to finish, or cancel it with POST /api/tasks/%(id)d/cancel"
    ) % {"kind": KIND_NAMES[JobKind(job.kind)], "id": job.pk, "processed": job.processed,
         "total": job.total}  # fmt: skip


def _prune(group: Group) -> None:
    old = list(
        KeyJob.objects.filter(group=group, finished_at__isnull=False)
        .order_by("-id")
        .values_list("id", flat=True)[KEEP_FINISHED : KEEP_FINISHED + 100]
    )
    if old:
        KeyJob.objects.filter(id__in=old).delete()
