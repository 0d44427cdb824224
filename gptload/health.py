"""`GET /health` (liveness) and `GET /health/ready` (readiness).

- `/health`: can this node serve? The database and, when configured, Redis answer.
  GPT-Load's endpoint, for a container's health check or a load balancer.
- `/health/ready`: is the installation doing all its work? The same checks, plus a
  Celery worker and beat heard from lately (`gptload.lib.heartbeat`): without them key
  imports, validations, cooling expiry and log pruning stand still. For deployment gates
  and alerting rather than a load balancer: a missing worker is the cluster's problem,
  not this node's.

Both answer 200 or 503. An anonymous caller learns the status alone (and, from
`/health/ready`, the names of the checks that failed): error texts name hosts, ports
and files. With the AUTH_KEY as a Bearer token, or a staff user's console session, the
answer has every check's details.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from gptload.lib import heartbeat
from gptload.metrics import authorized
from proxy.recorder import recorder

STARTED = time.monotonic()


def check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def check_redis() -> None:
    from django_redis import get_redis_connection

    get_redis_connection("default").ping()


def run_check(check: Callable[[], None]) -> dict[str, Any]:
    began = time.perf_counter()
    try:
        check()
    except Exception as exc:  # the point of a health check is to report any failure
        return {"status": "down", "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"status": "up", "latency_ms": round((time.perf_counter() - began) * 1000, 2)}


def store_checks() -> dict[str, dict[str, Any]]:
    checks = {"database": run_check(check_database)}
    if settings.REDIS_DSN:
        checks["redis"] = run_check(check_redis)
    return checks


def background_checks() -> dict[str, dict[str, Any]]:
    """The worker's and beat's heartbeats as checks: up when heard from lately."""
    checks = {}
    for role, seen in heartbeat.background().items():
        check: dict[str, Any] = {"status": "up" if seen.alive else "down"}
        check["last_seen"] = timestamp(seen.at) if seen.at is not None else None
        if seen.error:
            check["error"] = seen.error
        elif not seen.alive:
            check["error"] = (
                f"not heard from for more than {heartbeat.STALE_AFTER:.0f} s"
                if seen.at
                else "never heard from"
            )
        checks[role] = check
    return checks


def format_uptime(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (
        f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s" if minutes else f"{secs}s"
    )


def timestamp(at: float | None = None) -> str:
    moment = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def details(checks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    uptime = time.monotonic() - STARTED
    return {
        "timestamp": timestamp(),
        "uptime": format_uptime(uptime),
        "uptime_seconds": int(uptime),
        "role": "slave" if settings.IS_SLAVE else "master",
        "checks": checks,
        # This process's request-log buffer: rows waiting for the database, and rows
        # lost because the buffer was full (the database away for too long).
        "request_log": {
            "waiting": len(recorder.buffer),
            "written": recorder.written,
            "dropped": recorder.dropped,
        },
    }


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    checks = store_checks()
    healthy = all(result["status"] == "up" for result in checks.values())
    body: dict[str, Any] = {"status": "healthy" if healthy else "unhealthy"}
    if authorized(request):
        body.update(details(checks))
    return JsonResponse(body, status=200 if healthy else 503)


@require_GET
def ready(request: HttpRequest) -> JsonResponse:
    checks = store_checks() | background_checks()
    failed = [name for name, result in checks.items() if result["status"] != "up"]
    body: dict[str, Any] = {"status": "not_ready" if failed else "ready", "failed": failed}
    if authorized(request):
        body.update(details(checks))
    return JsonResponse(body, status=503 if failed else 200)
