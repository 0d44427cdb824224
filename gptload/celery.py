"""The Celery application, configured from Django settings (`CELERY_*`)."""

from __future__ import annotations

import logging.config
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


def _logging_as_configured() -> None:
    """The worker and beat log as the web server does: Django's `LOGGING` (LOG_FORMAT,
    LOG_FILE_PATH) at Celery's `--loglevel`. Left alone, Celery would replace the root
    logger's handlers with its own plain-text one (no JSON, no log file)."""
    from celery.signals import setup_logging

    @setup_logging.connect(weak=False)
    def configure(loglevel: int | str | None = None, **_: object) -> None:
        from django.conf import settings

        logging.config.dictConfig(settings.LOGGING)
        if loglevel:
            logging.getLogger().setLevel(loglevel)


def _worker_heartbeat() -> None:
    """A ready worker notes it is alive every half minute (gptload.lib.heartbeat); beat
    notes it from its scheduler (gptload.beat)."""
    from celery.signals import worker_ready, worker_shutdown

    from gptload.lib.heartbeat import WORKER, Pulse

    pulse = Pulse(WORKER)

    @worker_ready.connect(weak=False)
    def start(**_: object) -> None:
        pulse.start()

    @worker_shutdown.connect(weak=False)
    def stop(**_: object) -> None:
        pulse.stop()


_make_queue_folders()
_quiet_root_warning()
_beat_dies_with_the_worker()
_logging_as_configured()
_worker_heartbeat()
