"""What each access key used, read from its hourly rollups (never from the log table).

Days and months are those of the `TZ` setting. The rollups are hours of UTC, so where
TZ is a whole number of hours off UTC (most zones) a day is exactly its 24 rows; where
it is not (India, +5:30), the hour that straddles midnight counts for the day it began
in. This is the usage shown to operators; the proxy enforces the limits with counters
of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db.models import BigIntegerField, OuterRef, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from access.models import AccessKey
from keys.models import Group
from logs.models import AccessKeyHourlyStat

FIGURES = ("requests", "failures", "prompt_tokens", "completion_tokens", "total_tokens")
LIMITS = ("rpm", "tpm", "daily_tokens", "monthly_tokens", "max_concurrency")


@dataclass
class Totals:
    requests: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def day_start(now: datetime | None = None) -> datetime:
    """The last midnight in the `TZ` setting's time zone."""
    local = timezone.localtime(now or timezone.now(), timezone.get_default_timezone())
    return local.replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(now: datetime | None = None) -> datetime:
    """Midnight of the month's first day in the `TZ` setting's time zone."""
    return day_start(now).replace(day=1)


def hours_since(access_key_id: int, since: datetime) -> QuerySet[AccessKeyHourlyStat]:
    # (access_key_id, hour) leads the rollup's unique index: one range of it.
    return AccessKeyHourlyStat.objects.filter(access_key_id=access_key_id, hour__gte=since)


def totals(access_key_id: int, since: datetime) -> Totals:
    sums = hours_since(access_key_id, since).aggregate(**{name: Sum(name) for name in FIGURES})
    return Totals(**{name: int(sums[name] or 0) for name in FIGURES})


def by_group_and_model(access_key_id: int, since: datetime) -> list[dict[str, Any]]:
    """The key's figures per group it named and model, most tokens first."""
    rows = list(
        hours_since(access_key_id, since)
        .order_by()
        .values("group_id", "model")
        .annotate(**{f"{name}_sum": Sum(name) for name in FIGURES})
    )
    names = dict(
        Group.objects.filter(pk__in={r["group_id"] for r in rows}).values_list("pk", "name")
    )
    shown = [
        {"group_id": r["group_id"], "group_name": names.get(r["group_id"], ""), "model": r["model"],
         **{name: int(r[f"{name}_sum"] or 0) for name in FIGURES}}
        for r in rows
    ]  # fmt: skip
    return sorted(
        shown, key=lambda r: (-r["total_tokens"], -r["requests"], r["group_id"], r["model"])
    )


def usage(key: AccessKey, now: datetime | None = None) -> dict[str, Any]:
    """Today's and this month's figures of `key` next to its limits, and this month by
    group and model (`/api/access-keys/{id}/usage`)."""
    today, month = day_start(now), month_start(now)
    limits = {name: getattr(key, name) for name in LIMITS}
    used_today, used_month = totals(key.pk, today), totals(key.pk, month)
    return {
        "id": key.pk,
        "name": key.name,
        "time_zone": settings.TIME_ZONE,
        "today": {"since": today, **asdict(used_today)},
        "this_month": {"since": month, **asdict(used_month)},
        "limits": limits,
        "remaining": {
            "daily_tokens": left(key.daily_tokens, used_today.total_tokens),
            "monthly_tokens": left(key.monthly_tokens, used_month.total_tokens),
        },
        "by_group_model": by_group_and_model(key.pk, month),
    }


def left(limit: int, used: int) -> int | None:
    """Tokens left under `limit` (None: no limit; never below 0)."""
    return max(0, limit - used) if limit else None


def annotate_usage(keys: QuerySet[AccessKey]) -> QuerySet[AccessKey]:
    """Each key with `requests_today`, `failures_today`, `tokens_today` and the same for
    the month (`…_month`), for the console's list and change page: a range of the
    rollup's index per figure and key."""
    today, month = day_start(), month_start()

    def summed(name: str, since: datetime) -> Coalesce:
        hours = AccessKeyHourlyStat.objects.filter(access_key_id=OuterRef("pk"), hour__gte=since)
        total = hours.order_by().values("access_key_id").annotate(n=Sum(name)).values("n")
        return Coalesce(Subquery(total, output_field=BigIntegerField()), 0)

    return keys.annotate(
        requests_today=summed("requests", today),
        failures_today=summed("failures", today),
        tokens_today=summed("total_tokens", today),
        requests_month=summed("requests", month),
        failures_month=summed("failures", month),
        tokens_month=summed("total_tokens", month),
    )
