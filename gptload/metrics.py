"""`GET /metrics`: the node's figures in Prometheus's text format, for a scraper that
sends the AUTH_KEY as a Bearer token (never public: group names and traffic are an
operator's business).

Two kinds of figures:

- counted as the proxy works (`proxy.metrics`): requests, latency, gptload's own time,
  retries, the log buffer, snapshot builds. With several web workers each keeps its
  values in a file of `PROMETHEUS_MULTIPROC_DIR` and whichever worker answers the
  scrape sums every worker's (prometheus_client's multiprocess mode); the live gauges of
  workers that died are dropped first;
- read from the stores at each scrape (`StoreCollector`): keys by group and state, key
  jobs by kind and status (one grouped query each, never a row per key), and the
  background processes' last heartbeats. These are the cluster's, whichever node answers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from gptload.lib import heartbeat
from gptload.lib.api import is_admin_key
from keys.models import APIKey, Group, GroupType, JobKind, JobStatus, KeyJob, KeyStatus
from proxy import metrics as proxy_metrics

log = logging.getLogger("gptload")


def authorized(request: HttpRequest) -> bool:
    """The AUTH_KEY as a Bearer token, or a staff user's console session."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer " and is_admin_key(header[7:].strip()):
        return True
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_active and user.is_staff)


@require_GET
def scrape(request: HttpRequest) -> HttpResponse:
    if not authorized(request):
        response = HttpResponse(
            b"Send the AUTH_KEY as Authorization: Bearer.\n", status=401, content_type="text/plain"
        )
        response["WWW-Authenticate"] = 'Bearer realm="gptload metrics"'
        return response
    registry = CollectorRegistry(auto_describe=False)
    folder = settings.PROMETHEUS_MULTIPROC_DIR
    if folder:
        forget_dead_processes(Path(folder))
        MultiProcessCollector(registry, path=folder)
    else:
        registry.register(ThisProcess())
    registry.register(StoreCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


class ThisProcess:
    """The proxy's instruments as this process holds them (one web process)."""

    def collect(self) -> Iterator[Metric]:
        return iter(proxy_metrics.REGISTRY.collect())


def forget_dead_processes(folder: Path) -> None:
    """Drops the live gauges (the log buffer) of web workers that are gone (a worker
    uvicorn restarted); their counters stay, as counters must."""
    for file in folder.glob("gauge_live*_*.db"):
        pid = file.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not running(int(pid)):
            mark_process_dead(int(pid), str(folder))


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's: alive
    return True


class StoreCollector:
    """Figures read from the database and the heartbeats at each scrape."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "gptload_database_up", "Whether this scrape could read the database's figures."
        )
        try:
            families = [keys_by_state(), jobs_by_status()]
        except DatabaseError as exc:
            log.warning("metrics: the database's figures cannot be read (%s)", exc)
            up.add_metric([], 0)
            families = []
        else:
            up.add_metric([], 1)
        yield up
        yield from families
        yield heartbeats()


def keys_by_state() -> Metric:
    family = GaugeMetricFamily(
        "gptload_keys", "Upstream keys of each standard group, by state.", labels=["group", "state"]
    )
    names = dict(
        Group.objects.filter(group_type=GroupType.STANDARD).order_by().values_list("id", "name")
    )
    counts: dict[tuple[int, str], int] = {
        (group_id, status): count
        for group_id, status, count in APIKey.objects.order_by()
        .values_list("group_id", "status")
        .annotate(count=Count("id"))
    }
    for group_id, name in sorted(names.items(), key=lambda item: item[1]):
        for state in KeyStatus.values:
            family.add_metric([name, state], counts.get((group_id, state), 0))
    return family


def jobs_by_status() -> Metric:
    family = GaugeMetricFamily(
        "gptload_key_jobs",
        "Key jobs (imports, deletions, validations) by kind and status.",
        labels=["kind", "status"],
    )
    counts: dict[tuple[Any, Any], int] = {
        (kind, status): count
        for kind, status, count in KeyJob.objects.order_by()
        .values_list("kind", "status")
        .annotate(count=Count("id"))
    }
    for kind in JobKind.values:
        for status in JobStatus.values:
            family.add_metric([kind, status], counts.get((kind, status), 0))
    return family


def heartbeats() -> Metric:
    family = GaugeMetricFamily(
        "gptload_heartbeat_timestamp_seconds",
        "When a Celery worker and beat were last heard from (Unix time); absent if never.",
        labels=["process"],
    )
    for role, seen in heartbeat.background().items():
        if seen.at is not None:
            family.add_metric([role], seen.at)
    return family
