"""`manage.py serve`: check the stores, migrate (master only) and serve the ASGI app with uvicorn."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import uvicorn
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connection

from gptload.lib import lifeline
from gptload.lib.dsn import describe_database, mask_url
from gptload.lib.httpserver import TimedHttpTools
from gptload.lib.secrets import weakness
from gptload.metrics import running
from gptload.worker import WorkerSupervisor


class Command(BaseCommand):
    help = "Serve gptload (proxy, admin, API) on HOST:PORT with uvicorn."
    requires_system_checks: list[str] = []
    requires_migrations_checks = False

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.HOST, help="default: HOST (%(default)s)")
        parser.add_argument(
            "--port", type=int, default=settings.PORT, help="default: PORT (%(default)s)"
        )
        parser.add_argument(
            "--workers", type=int, default=settings.WEB_CONCURRENCY,
            help="web worker processes (default: WEB_CONCURRENCY, %(default)s)",
        )  # fmt: skip
        parser.add_argument("--no-migrate", action="store_true", help="skip migrations")
        parser.add_argument(
            "--worker", action=argparse.BooleanOptionalAction, default=None,
            help="also run the embedded Celery worker with beat (default: on without "
            "REDIS_DSN on a master node, off otherwise: run `celery -A gptload worker` "
            "and one `celery -A gptload beat` yourself)",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        warn_about_secrets(self.stderr.write)
        check_stores()
        if settings.IS_SLAVE:
            self.stdout.write("IS_SLAVE=true: not running migrations (the master node does).")
        elif not options["no_migrate"]:
            try:
                call_command("migrate", interactive=False, verbosity=0)
            except DatabaseError as exc:
                raise CommandError(
                    f"migrations failed on {describe_database(connection.settings_dict)}: {exc}"
                ) from None
        self.stdout.write(
            f"gptload serving on http://{options['host']}:{options['port']} "
            f"(admin /admin/, health /health; {describe_database(connection.settings_dict)}"
            f"{', redis ' + mask_url(settings.REDIS_DSN) if settings.REDIS_DSN else ', no redis'})"
        )
        self.stdout.flush()
        connection.close()  # the server's workers open their own
        # uvicorn's worker processes inherit the environment: they die with this process,
        # and know the address they serve (for the endpoints they print).
        os.environ.update(lifeline.child_env({}), PORT=str(options["port"]),
                          HOST=options["host"])  # fmt: skip
        settings.PORT, settings.HOST = options["port"], options["host"]
        # Several workers share their metrics through files (see gptload.metrics); one
        # serves in this process and keeps them in memory.
        metrics_folder = fresh_metrics_folder() if options["workers"] > 1 else None
        if options["workers"] > 1 and not settings.REDIS_DSN:
            self.stdout.write(
                f"note: {options['workers']} web workers and no Redis: each worker counts "
                "access key limits (and failed sign-ins) on its own, so a client may get up "
                "to that many times its limits; set REDIS_DSN to count them once."
            )
        if metrics_folder is not None:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_folder)
        embedded = options["worker"]
        if embedded is None:
            embedded = not settings.REDIS_DSN and not settings.IS_SLAVE
        supervisor = WorkerSupervisor() if embedded else None
        if supervisor is not None:
            broker = "Redis broker" if settings.REDIS_DSN else "filesystem broker"
            self.stdout.write(f"embedded Celery worker with beat: on ({broker})")
            self.stdout.flush()
            supervisor.start()
        else:
            # Nothing here runs the jobs: say what must, so that they are not left pending.
            self.stdout.write(
                "no embedded Celery worker: key imports, validations and the periodic jobs "
                "need, somewhere in this installation,\n"
                "  celery -A gptload worker --loglevel=warning   (one or more)\n"
                "  celery -A gptload beat --loglevel=warning     (exactly one)\n"
                "/health/ready and the dashboard say when none has been seen lately."
            )
            self.stdout.flush()
        # uvicorn re-raises SIGTERM once it has shut down gracefully; exit 0 then, as a
        # clean stop should look to a supervisor.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            self.serve(options)
        finally:
            if supervisor is not None:
                supervisor.stop()
            if metrics_folder is not None:
                shutil.rmtree(metrics_folder, ignore_errors=True)

    def serve(self, options: dict[str, Any]) -> None:
        uvicorn.run(
            "gptload.asgi:application",
            host=options["host"],
            port=options["port"],
            workers=options["workers"],
            lifespan="on",
            log_config=None,  # Django's LOGGING (LOG_LEVEL, LOG_FORMAT, LOG_FILE_PATH) rules
            timeout_keep_alive=settings.SERVER_IDLE_TIMEOUT,
            timeout_graceful_shutdown=settings.SERVER_GRACEFUL_SHUTDOWN_TIMEOUT,
            server_header=False,
            # uvicorn formats every access line before the logger drops it: only at debug.
            access_log=settings.LOG_LEVEL == "debug",
            proxy_headers=True,
            http=TimedHttpTools,  # a deadline on each request's headers
            forwarded_allow_ips=settings.FORWARDED_ALLOW_IPS,
        )


def fresh_metrics_folder() -> Path:
    """An empty directory for this start's metric files, `STATE_DIR/metrics/<pid>`; those
    of earlier starts that are gone (killed before they could remove theirs) are removed."""
    parent = Path(settings.STATE_DIR) / "metrics"
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.iterdir():
        if old.name.isdigit() and not running(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    folder = parent / str(os.getpid())
    shutil.rmtree(folder, ignore_errors=True)  # a pid of an earlier boot, reused
    folder.mkdir()
    return folder


def check_stores() -> None:
    """Raises `CommandError` with one line when the database or Redis cannot be reached."""
    try:
        connection.ensure_connection()
    except DatabaseError as exc:
        raise CommandError(
            f"DATABASE_DSN: cannot connect to {describe_database(connection.settings_dict)}: {exc}"
        ) from None
    if settings.REDIS_DSN:
        from django_redis import get_redis_connection
        from redis.exceptions import RedisError

        try:
            get_redis_connection("default").ping()
        except RedisError as exc:
            raise CommandError(
                f"REDIS_DSN: cannot connect to {mask_url(settings.REDIS_DSN)}: {exc}"
            ) from None


BANNER = "!" * 78


def warn_about_secrets(write: Any) -> None:
    kept: Path | None = settings.AUTH_KEY_FILE
    shown = kept.with_name(kept.name + ".shown") if kept else None
    if kept is not None and shown is not None and not shown.exists():
        write(
            f"{BANNER}\n!! No AUTH_KEY is set, so gptload made one; it keeps it in {kept}\n"
            f"!! (mode 0600). It signs in to the console (/admin/) and opens the management\n"
            f"!! API (/api); keep it for yourself:\n"
            f"!!\n!!     {settings.AUTH_KEY}\n!!\n"
            "!! It is shown this once; `manage.py auth_key` prints it again. Clients use\n"
            "!! proxy keys instead: `manage.py auth_key --proxy` prints the global one.\n"
            f"{BANNER}"
        )
        shown.touch()
        return
    problem = weakness(settings.AUTH_KEY)
    if problem:
        write(
            f"{BANNER}\n!! WARNING: AUTH_KEY is weak: {problem}.\n"
            "!! It signs in to the console (/admin/) and opens the management API\n"
            "!! (/api). Set AUTH_KEY to a long random value before exposing this port.\n"
            f"{BANNER}"
        )
        sys.stderr.flush()
