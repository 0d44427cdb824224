"""Celery tasks of the keys app: thin shells over `keys.jobs`."""

from __future__ import annotations

from celery import shared_task

from keys import jobs, periodic


@shared_task(ignore_result=True)
def run_job(job_id: int) -> None:
    """Runs a queued key job (import, delete, validate) and records its outcome."""
    jobs.run(job_id)


@shared_task(ignore_result=True)
def validate_due_groups() -> list[str]:
    """Beat: queues the validation of invalid keys of every group that is due."""
    return periodic.validate_due_groups()


@shared_task(ignore_result=True)
def expire_cooling() -> int:
    """Beat: stores keys whose rate-limit cooling has ended as active again."""
    return periodic.expire_cooling()


@shared_task(ignore_result=True)
def recount_keys() -> int:
    """Beat, daily: every group's keys counted afresh (the tally is kept as keys change)."""
    return periodic.recount_keys()
