"""The dashboard's figures, for the API (`/api/dashboard/*`) and the console alike.

Read from the hourly rollups and the live counters (`logs.live`), never by scanning the
log table, so that they cost the same at 10 M rows as at 10.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q, QuerySet, Sum
from django.utils import timezone

from gptload.lib import heartbeat
from gptload.lib.secrets import constant_time_in, weakness
from keys.models import APIKey, Group, GroupType, KeyStatus, KeyTally
from logs import live
from logs.models import HourlyStat
from settings_app.models import SystemSetting


def change(current: float, previous: float) -> tuple[float, bool]:
    """GPT-Load's trend: % change, 100 when there was nothing before, 0 when nothing at all."""
    if previous > 0:
        trend = (current - previous) / previous * 100
        return round(trend, 2), trend >= 0
    return (100.0, True) if current > 0 else (0.0, True)


def standard_groups_only(stats: QuerySet[HourlyStat]) -> QuerySet[HourlyStat]:
    """Without the rows of aggregate groups: their traffic is already in their members'."""
    aggregates = Group.objects.filter(group_type=GroupType.AGGREGATE).values("id")
    return stats.exclude(group_id__in=aggregates)


def current_hour() -> datetime:
    return timezone.now().replace(minute=0, second=0, microsecond=0)


def key_card(counts: dict[str, int]) -> dict[str, Any]:
    invalid = counts.get(KeyStatus.INVALID, 0)
    return {"value": counts.get(KeyStatus.ACTIVE, 0), "sub_value": invalid,
            "sub_value_tip": "invalid keys", "invalid": invalid,
            "cooling": counts.get(KeyStatus.COOLING, 0),
            "disabled": counts.get(KeyStatus.DISABLED, 0)}  # fmt: skip


def rpm_card() -> dict[str, Any]:
    """Final requests per minute over the last 10 minutes, against the 10 before: from the
    live counters, so it moves as calls end (not when their log rows are written)."""
    # 20 whole minutes; the current one is unfinished.
    minutes = live.counters.read(21, timezone.now().timestamp())[:-1]
    previous = sum(ok + failed for ok, failed, _ in minutes[:10])
    current = sum(ok + failed for ok, failed, _ in minutes[10:])
    rpm, before = current / 10, previous / 10
    trend, good = change(rpm, before)
    return {"value": rpm, "trend": trend, "trend_is_growth": good}


def day_totals() -> tuple[dict[str, int], dict[str, int]]:
    """Sums over the 24 hourly buckets up to the current one and the 24 before them."""
    this_hour = current_hour()
    start, boundary = this_hour - timedelta(hours=47), this_hour - timedelta(hours=23)
    stats = HourlyStat.objects.filter(time__gte=start, time__lt=this_hour + timedelta(hours=1))
    stats = standard_groups_only(stats)
    fields = (
        "success_count",
        "failure_count",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
    )
    sums = stats.aggregate(
        **{f"now_{f}": Sum(f, filter=Q(time__gte=boundary)) for f in fields},
        **{f"before_{f}": Sum(f, filter=Q(time__lt=boundary)) for f in fields},
    )
    now = {f: int(sums[f"now_{f}"] or 0) for f in fields}
    before = {f: int(sums[f"before_{f}"] or 0) for f in fields}
    return now, before


def request_and_error_cards(
    now: dict[str, int], before: dict[str, int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    total = now["success_count"] + now["failure_count"]
    total_before = before["success_count"] + before["failure_count"]
    trend, good = change(total, total_before)
    requests = {"value": total, "trend": trend, "trend_is_growth": good}
    rate = now["failure_count"] / total * 100 if total else 0.0
    rate_before = before["failure_count"] / total_before * 100 if total_before else 0.0
    # With nothing to compare with, the trend is the rate itself (as GPT-Load shows it).
    points = rate - rate_before if total_before else rate
    errors = {"value": round(rate, 2), "trend": round(points, 2), "trend_is_growth": points <= 0}
    return requests, errors


def token_card(now: dict[str, int], before: dict[str, int]) -> dict[str, Any]:
    trend, good = change(now["total_tokens"], before["total_tokens"])
    return {"value": now["total_tokens"], "trend": trend, "trend_is_growth": good,
            "prompt_tokens": now["prompt_tokens"],
            "completion_tokens": now["completion_tokens"]}  # fmt: skip


STRONG_ADVICE = "Use a random string of 32 or more characters (e.g. `openssl rand -hex 32`)."


def secret_warnings(name: str, secret: str) -> list[dict[str, str]]:
    """Warnings about one configured secret, naming it by `name` and never quoting it."""
    reason = weakness(secret)
    if reason:
        return [{"type": name, "message": f"{name} is weak: {reason}.", "severity": "high",
                 "suggestion": STRONG_ADVICE}]  # fmt: skip
    if len(secret) < 32:
        return [{"type": name, "severity": "medium", "suggestion": STRONG_ADVICE,
                 "message": f"{name} has {len(secret)} characters; 32 or more are recommended."}]  # fmt: skip
    return []


def security_warnings() -> list[dict[str, str]]:
    warnings = secret_warnings("AUTH_KEY", settings.AUTH_KEY)
    if settings.ENCRYPTION_KEY:
        warnings += secret_warnings("ENCRYPTION_KEY", settings.ENCRYPTION_KEY)
    else:
        warnings.append({"type": "ENCRYPTION_KEY", "severity": "high",
                         "message": "ENCRYPTION_KEY is not set: upstream keys are stored in "
                                    "plaintext in the database.",
                         "suggestion": "Set ENCRYPTION_KEY to a random string of 32 or more "
                                       "characters before importing keys; keys already stored "
                                       "must then be re-encrypted."})  # fmt: skip
    global_keys = str(SystemSetting.objects.effective()["proxy_keys"]).split(",")
    for number, key in enumerate((k for k in global_keys if k), start=1):
        warnings += proxy_key_warnings(f"Global proxy key #{number}", key)
    for group in Group.objects.exclude(proxy_keys="").order_by("sort", "id"):
        for number, key in enumerate(group.proxy_key_list, start=1):
            warnings += proxy_key_warnings(f"Proxy key #{number} of group {group.name}", key)
    return warnings


def proxy_key_warnings(name: str, key: str) -> list[dict[str, str]]:
    warnings = secret_warnings(name, key)
    if constant_time_in(key, (settings.AUTH_KEY,)):
        warnings.append({"type": name, "severity": "high",
                         "message": f"{name} is the same as AUTH_KEY: a client that may use "
                                    "the proxy with it can also use the admin API.",
                         "suggestion": "Give clients their own proxy keys and keep AUTH_KEY "
                                       "for administrators."})  # fmt: skip
    return warnings


def stats(key_counts: dict[str, int] | None = None) -> dict[str, Any]:
    """GPT-Load's dashboard cards: keys, requests per minute, 24 h requests, error rate and
    tokens (each with its trend), and the security warnings."""
    now, before = day_totals()
    requests, errors = request_and_error_cards(now, before)
    counts = key_states() if key_counts is None else key_counts
    return {"key_count": key_card(counts), "rpm": rpm_card(), "request_count": requests,
            "error_rate": errors, "token_count": token_card(now, before),
            "security_warnings": security_warnings()}  # fmt: skip


def hourly_chart(hours: int, group_id: int | None = None) -> dict[str, Any]:
    """Successful and failed final requests per hour over the last `hours` hours (the
    current one last), for one group (aggregates included) or all standard groups."""
    first = current_hour() - timedelta(hours=hours - 1)
    stats = HourlyStat.objects.filter(time__gte=first, time__lt=first + timedelta(hours=hours))
    stats = stats.filter(group_id=group_id) if group_id is not None else standard_groups_only(stats)
    per_hour = {
        row["time"]: row
        for row in stats.order_by().values("time").annotate(ok=Sum("success_count"),
                                                             failed=Sum("failure_count"))
    }  # fmt: skip
    times = [first + timedelta(hours=i) for i in range(hours)]
    series = [per_hour.get(t, {}) for t in times]
    return {
        "labels": [t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in times],
        "datasets": [
            {"label": "Successful requests", "color": "rgba(10, 200, 110, 1)",
             "data": [int(s.get("ok") or 0) for s in series]},
            {"label": "Failed requests", "color": "rgba(255, 70, 70, 1)",
             "data": [int(s.get("failed") or 0) for s in series]},
        ],
    }  # fmt: skip


def top_groups_and_models(hours: int = 24, limit: int = 5) -> dict[str, list[dict[str, Any]]]:
    """The busiest and the most failing groups and models over the last `hours` hours."""
    since = current_hour() - timedelta(hours=hours - 1)
    stats = HourlyStat.objects.filter(time__gte=since)
    names = dict(Group.objects.values_list("pk", "name"))
    result: dict[str, list[dict[str, Any]]] = {}
    for field, label in (("group_id", "groups"), ("model", "models")):
        rows = list(stats.order_by().values(field).annotate(ok=Sum("success_count"),
                                                            failed=Sum("failure_count")))  # fmt: skip
        for row in rows:
            row["name"] = (
                names.get(row[field], f"#{row[field]}")
                if field == "group_id"
                else row[field] or "-"
            )
            row["total"] = int(row["ok"] or 0) + int(row["failed"] or 0)
        result[f"{label}_by_traffic"] = sorted(rows, key=lambda r: -r["total"])[:limit]
        result[f"{label}_by_errors"] = sorted([r for r in rows if r["failed"]],
                                              key=lambda r: -r["failed"])[:limit]  # fmt: skip
    return result


def top_keys(limit: int = 5) -> dict[str, list[dict[str, Any]]]:
    """The keys with the most requests and the most failures (their lifetime counters).

    Read off the counters' indexes without a join (joined to the groups, MariaDB reads
    every key of every group and sorts them: 0.4 s at 200,000 keys); the few groups
    named are looked up after.
    """
    fields = ("pk", "group_id", "key_value", "request_count", "failure_count", "status")
    busiest = list(APIKey.objects.order_by("-request_count").values(*fields)[:limit])
    failing = list(APIKey.objects.filter(failure_count__gt=0).order_by("-failure_count")
                   .values(*fields)[:limit])  # fmt: skip
    names = dict(Group.objects.filter(pk__in={row["group_id"] for row in busiest + failing})
                 .values_list("pk", "name"))  # fmt: skip
    for row in busiest + failing:
        row["group__name"] = names.get(row["group_id"], "")
    return {"keys_by_traffic": busiest, "keys_by_errors": failing}


def key_states() -> dict[str, int]:
    """Keys by state, all groups (from the tally: a few rows per group, not every key)."""
    counts = dict(KeyTally.objects.order_by().values_list("status").annotate(n=Sum("count")))
    return {status: int(counts.get(status, 0)) for status in KeyStatus.values}


def tokens_today() -> int:
    """Tokens of final requests since midnight (TZ), the current hour as counted live."""
    midnight = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    this_hour = current_hour()
    stored = standard_groups_only(HourlyStat.objects.filter(time__gte=midnight, time__lt=this_hour))
    past = int(stored.aggregate(t=Sum("total_tokens"))["t"] or 0)
    return past + max(current_hour_tokens(), live_hour()[2])


def current_hour_tokens() -> int:
    stats = standard_groups_only(HourlyStat.objects.filter(time=current_hour()))
    return int(stats.aggregate(t=Sum("total_tokens"))["t"] or 0)


def live_hour() -> tuple[int, int, int]:
    """(ok, failed, tokens) counted live since the current hour began."""
    minutes = timezone.now().minute + 1
    rows = live.counters.read(minutes, timezone.now().timestamp())
    return (sum(r[0] for r in rows), sum(r[1] for r in rows), sum(r[2] for r in rows))


def live_figures() -> dict[str, Any]:
    """What the console's dashboard refreshes every few seconds: the cards and the
    current hour's bar, with the calls of the current hour counted as they end."""
    keys = key_states()
    figures = stats(keys)
    ok, failed, _ = live_hour()
    stored = standard_groups_only(HourlyStat.objects.filter(time=current_hour())).aggregate(
        ok=Sum("success_count"), failed=Sum("failure_count"))  # fmt: skip
    hour_ok, hour_failed = max(ok, int(stored["ok"] or 0)), max(failed, int(stored["failed"] or 0))
    # The 24 h cards count stored rows; calls of this hour not yet written are added.
    unwritten = max(0, hour_ok + hour_failed - int(stored["ok"] or 0) - int(stored["failed"] or 0))
    figures["request_count"]["value"] += unwritten
    return {"cards": figures, "keys": keys, "tokens_today": tokens_today(),
            "hour": {"ok": hour_ok, "failed": hour_failed}}  # fmt: skip


OPERATIONS = {
    heartbeat.WORKER: ("No Celery worker has been heard from lately ({seen}): key imports, "
                       "validations and log pruning are not running.",
                       "Start one: make run (no Redis) starts one with serve; in a cluster run "
                       "`celery -A gptload worker`."),
    heartbeat.BEAT: ("Celery beat has not been heard from lately ({seen}): validations, "
                     "cooling expiry and log pruning are not being scheduled.",
                     "Run exactly one `celery -A gptload beat` in the cluster (the worker "
                     "make run starts includes it)."),
}  # fmt: skip


def operations_warnings() -> list[dict[str, str]]:
    """A Celery worker or beat not heard from lately (`gptload.lib.heartbeat`, which
    `/health/ready` reads too)."""
    warnings = []
    for role, seen in heartbeat.background().items():
        if seen.alive:
            continue
        when = datetime.fromtimestamp(seen.at, UTC) if seen.at is not None else None
        shown = f"last seen {timezone.localtime(when):%Y-%m-%d %H:%M}" if when else "never seen"
        message, suggestion = OPERATIONS[role]
        warnings.append({"type": role, "severity": "high",
                         "message": message.format(seen=shown), "suggestion": suggestion})  # fmt: skip
    return warnings
