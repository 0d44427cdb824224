"""Celery tasks of the logs app: thin shells over plain functions."""

from __future__ import annotations

from celery import shared_task

from logs import retention


@shared_task(ignore_result=True)
def prune_logs() -> dict[str, int]:
    """Beat: deletes request logs past their retention, in small batches."""
    return retention.prune_logs()
