"""The Celery application, configured from Django settings (`CELERY_*`)."""

from __future__ import annotations

import os

from celery import Celery

from gptload.lib.env import load_settings_or_exit

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gptload.settings")
load_settings_or_exit()

app = Celery("gptload")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def _make_queue_folders() -> None:
    """The filesystem broker (embedded mode) needs its folders before anyone publishes."""
    from django.conf import settings

    if not settings.REDIS_DSN:
        for folder in ("queue", "control"):
            (settings.CELERY_DATA_DIR / folder).mkdir(parents=True, exist_ok=True)


_make_queue_folders()
