"""The Celery application, configured from Django settings (`CELERY_*`)."""

from __future__ import annotations

import os
import warnings

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


def _quiet_root_warning() -> None:
    """Celery warns when its worker runs as root. The embedded worker runs as the user who
    started `serve`, with no more rights than the web server beside it: the warning
    repeats at every start and tells the operator nothing new (kept at LOG_LEVEL=debug)."""
    from celery.exceptions import SecurityWarning
    from django.conf import settings

    if settings.LOG_LEVEL != "debug":
        warnings.filterwarnings("ignore", category=SecurityWarning)


def _beat_dies_with_the_worker() -> None:
    """`worker --beat` forks beat into a process of its own. The worker dies with `serve`
    (gptload.lib.lifeline); beat must too, or a killed `serve` leaves a beat behind that
    keeps sending the periodic jobs beside the next one's."""
    from celery.signals import beat_init

    from gptload.lib import lifeline

    if not os.environ.get(lifeline.VARIABLE):
        return  # a beat started on its own (a cluster's `celery beat`): nobody to die with
    worker = os.getpid()  # this module is imported in the worker, before it forks beat

    @beat_init.connect(weak=False)
    def hold(**_: object) -> None:
        if os.getpid() != worker:
            lifeline.hold_forked(worker)


_make_queue_folders()
_quiet_root_warning()
_beat_dies_with_the_worker()
