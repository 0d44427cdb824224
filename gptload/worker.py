"""The embedded Celery worker: one process with beat inside, beside the web server.

With no `REDIS_DSN`, `manage.py serve` (and so `make run`) starts it on kombu's
filesystem broker, so that background jobs (key imports, validation) and the periodic
jobs run with nothing else installed. The supervisor restarts a worker that dies
(after 1 s, doubling up to 30 s while it keeps dying at once) and stops it with the
server. In cluster mode (Redis) workers and exactly one beat run as their own processes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from django.conf import settings

from gptload.lib import lifeline

log = logging.getLogger("gptload")
STEADY_SECONDS = 30.0  # a worker that ran this long and died is restarted at once
MAX_BACKOFF = 30.0


def worker_command() -> list[str]:
    """The embedded worker: quiet (no banner, warnings only) unless LOG_LEVEL=debug."""
    debug = settings.LOG_LEVEL == "debug"
    return [sys.executable, "-m", "celery", "-A", "gptload", *([] if debug else ["--quiet"]),
            "worker", "--beat", "--pool=solo", "--concurrency=1",
            f"--loglevel={'info' if debug else 'warning'}",
            "--hostname=embedded@%h", "--without-gossip", "--without-mingle"]  # fmt: skip


class WorkerSupervisor:
    def __init__(self, command: list[str] | None = None) -> None:
        self.command = command or worker_command()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        settings.CELERY_DATA_DIR.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            began = time.monotonic()
            # Its own process group: a Ctrl-C on the terminal reaches it through us, once.
            # Run from the project folder, wherever `serve` was started from: `-A gptload`
            # is found on the working directory (Celery does not put the script's folder
            # on the path as `manage.py` does).
            self.process = subprocess.Popen(  # noqa: S603 - our own argv
                self.command, start_new_session=True, env=lifeline.child_env(),
                cwd=settings.BASE_DIR,
            )  # fmt: skip
            code = self.process.wait()
            if self._stopping.is_set():
                return
            backoff = (
                1.0 if time.monotonic() - began > STEADY_SECONDS else min(backoff * 2, MAX_BACKOFF)
            )
            self.restarts += 1
            log.warning(
                "embedded Celery worker exited with %s; restarting in %.0f s", code, backoff
            )
            self._stopping.wait(backoff)

    def stop(self, timeout: float = 10.0) -> None:
        """Asks the worker for a warm shutdown (it finishes the job at hand), then kills it."""
        self._stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._thread is not None:
            self._thread.join(timeout)
