"""`GET /health`: is this node able to serve? Checks the database and, when configured, Redis."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from proxy.recorder import recorder

STARTED = time.monotonic()


def check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def check_redis() -> None:
    from django_redis import get_redis_connection

    get_redis_connection("default").ping()


def run_check(check: Any) -> dict[str, Any]:
    began = time.perf_counter()
    try:
        check()
    except Exception as exc:  # the point of a health check is to report any failure
        return {"status": "down", "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"status": "up", "latency_ms": round((time.perf_counter() - began) * 1000, 2)}


def format_uptime(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (
        f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s" if minutes else f"{secs}s"
    )


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    checks = {"database": run_check(check_database)}
    if settings.REDIS_DSN:
        checks["redis"] = run_check(check_redis)
    healthy = all(result["status"] == "up" for result in checks.values())
    uptime = time.monotonic() - STARTED
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
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
    return JsonResponse(body, status=200 if healthy else 503)
