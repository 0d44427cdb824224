"""Celery tasks of the keys app: thin shells over `keys.jobs`."""

from __future__ import annotations

from celery import shared_task

from keys import jobs


@shared_task(ignore_result=True)
def run_job(job_id: int) -> None:
    """Runs a queued key job (import, delete, validate) and records its outcome."""
    jobs.run(job_id)
