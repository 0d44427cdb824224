"""Request log retention: old rows go in small batches, so a 10M-row table never locks."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from logs.models import HourlyStat, RequestLog
from settings_app.models import SystemSetting

BATCH = 5000


def prune_logs(now: datetime | None = None) -> dict[str, int]:
    """Deletes request logs older than `request_log_retention_days` (0: keep them all)
    and hourly statistics older than `STATS_RETENTION_DAYS`; returns the counts."""
    now = now or timezone.now()
    days = int(SystemSetting.objects.typed_values().get("request_log_retention_days", 7))
    logs = delete_before(RequestLog, "timestamp", now - timedelta(days=days)) if days else 0
    stats_days = settings.STATS_RETENTION_DAYS
    stats = delete_before(HourlyStat, "time", now - timedelta(days=stats_days)) if stats_days else 0
    return {"request_logs": logs, "hourly_stats": stats}


def delete_before(model: type[RequestLog] | type[HourlyStat], field: str, cutoff: datetime) -> int:
    """Deletes `model` rows whose `field` is before `cutoff`, BATCH rows per statement."""
    deleted = 0
    old = model.objects.filter(**{f"{field}__lt": cutoff})
    while True:
        ids = list(old.order_by(field).values_list("pk", flat=True)[:BATCH])
        if not ids:
            return deleted
        deleted += model.objects.filter(pk__in=ids).delete()[0]  # no cascades: a fast delete
