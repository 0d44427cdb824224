"""Celery beat's scheduler (`CELERY_BEAT_SCHEDULER`): django-celery-beat's, which reads
the schedules from the database, noting beat's heartbeat as it turns.

Noted from the scheduler's loop rather than a thread of its own, so that a beat whose
loop stopped (stuck on a database that went away) goes quiet too; at most once every
`heartbeat.INTERVAL` seconds. Its own module: Celery loads it once Django's apps are
ready, which `gptload.celery` is imported before.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django_celery_beat.schedulers import DatabaseScheduler

from gptload.lib import heartbeat

log = logging.getLogger("gptload")


class Scheduler(DatabaseScheduler):
    _noted = -heartbeat.INTERVAL

    def tick(self, *args: Any, **kwargs: Any) -> float:
        now = time.monotonic()
        if now - self._noted >= heartbeat.INTERVAL:
            self._noted = now
            try:
                heartbeat.note(heartbeat.BEAT)
            except Exception as exc:  # a process edge: beat goes on scheduling
                log.warning("beat heartbeat not recorded (%s)", exc)
        return float(super().tick(*args, **kwargs))
