"""Request statistics from the hourly rollups (never from the log table itself)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from django.db.models import IntegerField, OuterRef, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from keys.groups import KeyCounts, key_counts
from keys.models import Group
from logs.models import HourlyStat

STAT_WINDOWS = (("stats_24_hour", 24), ("stats_7_day", 7 * 24), ("stats_30_day", 30 * 24))


def request_stats(group_id: int, hours: int, now: datetime | None = None) -> dict[str, Any]:
    """Final requests and failures of the last `hours` hourly buckets, the current included."""
    now = now or timezone.now()
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    totals = HourlyStat.objects.filter(
        group_id=group_id, time__gte=end - timedelta(hours=hours), time__lt=end
    ).aggregate(ok=Sum("success_count"), failed=Sum("failure_count"))
    failed = int(totals["failed"] or 0)
    total = int(totals["ok"] or 0) + failed
    return {
        "total_requests": total,
        "failed_requests": failed,
        "failure_rate": round(failed / total, 4) if total else 0.0,
    }


def group_stats(group: Group) -> dict[str, Any]:
    """GPT-Load's group stats; an aggregate's key stats are the sum of its members' keys."""
    if group.is_aggregate:
        member_ids = list(group.members.values_list("sub_group_id", flat=True))
    else:
        member_ids = [group.pk]
    keys = KeyCounts()
    for counts in key_counts(member_ids).values():
        keys.merge(counts)
    now = timezone.now()
    stats: dict[str, Any] = {"key_stats": asdict(keys)}
    for name, hours in STAT_WINDOWS:
        stats[name] = request_stats(group.pk, hours, now)
    return stats


def annotate_24h_traffic(groups: QuerySet[Group]) -> QuerySet[Group]:
    """Each group's final requests (ok, failed) over the last 24 hours, from the rollups."""
    since = timezone.now() - timedelta(hours=24)
    hours = HourlyStat.objects.filter(group_id=OuterRef("pk"), time__gte=since).order_by()
    totals = hours.values("group_id").annotate(ok=Sum("success_count"), bad=Sum("failure_count"))
    return groups.annotate(
        ok_24h=Coalesce(Subquery(totals.values("ok"), output_field=IntegerField()), 0),
        failed_24h=Coalesce(Subquery(totals.values("bad"), output_field=IntegerField()), 0),
    )
