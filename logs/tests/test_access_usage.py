"""Access key usage: log rows name their key, the writer rolls final attempts up per access
key × group × model × hour, `/api/access-keys/{id}/usage` reads the rollups (days and
months of TZ), and retention prunes them with the hourly statistics."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from django.db.models import Count, Q, Sum
from django.test import override_settings

from access.models import AccessKey
from gptload.lib.providers.base import Usage
from keys.models import Group
from logs import retention, usage
from logs.models import AccessKeyHourlyStat, HourlyStat, RequestLog
from logs.writer import LogEntry, write_batch

pytestmark = pytest.mark.django_db
OPENAI = [{"url": "https://api.openai.com", "weight": 1}]


@pytest.fixture
def world():
    member = Group.objects.create(name="member", channel_type="openai", test_model="m",
                                  upstreams=OPENAI)  # fmt: skip
    mix = Group.objects.create(name="mix", channel_type="openai", group_type="aggregate")
    key = AccessKey(name="billing", daily_tokens=1000, monthly_tokens=50_000, rpm=7)
    key.issue()
    key.save()
    return {"member": member, "mix": mix, "key": key}


def entry(group, when, *, key=None, status=200, final=True, model="gpt-4o", tokens=(10, 5),
          parent=None):  # fmt: skip
    return LogEntry(
        timestamp=when, group_id=group.pk, group_name=group.name,
        parent_group_id=parent.pk if parent else None, parent_group_name=parent.name if parent else "",
        key_id=None, key_stored="", key_hash="", model=model, status=status,
        error="" if status < 400 else "upstream said no", final=final, duration_ms=12,
        source_ip="203.0.113.9", request_path="/v1/chat/completions", upstream="u", stream=False,
        usage=Usage(*tokens) if tokens else None, access_key_id=key.pk if key else None,
    )  # fmt: skip


def rollups():
    return {
        (row.hour, row.access_key_id, row.group_id, row.model): (
            row.requests, row.failures, row.prompt_tokens, row.completion_tokens, row.total_tokens)
        for row in AccessKeyHourlyStat.objects.all()
    }  # fmt: skip


def test_final_attempts_with_an_access_key_roll_up_per_key_group_and_model(world):
    member, mix, key = world["member"], world["mix"], world["key"]
    hour = 1_800_000_000 - 1_800_000_000 % 3600
    write_batch([
        entry(member, hour + 10, key=key),
        entry(member, hour + 20, key=key, status=500, tokens=None),
        entry(member, hour + 30, key=key, status=429, final=False),  # a retry: not a call
        entry(member, hour + 40, key=key, parent=mix, tokens=(100, 1)),  # through the aggregate
        entry(member, hour + 50, key=key, model="o3", tokens=(1, 1)),
        entry(member, hour + 3600, key=key),  # the next hour
        entry(member, hour + 60),  # no access key: the group's rollup only
    ])  # fmt: skip
    start = datetime.fromtimestamp(hour, UTC)
    after = start + timedelta(hours=1)
    assert rollups() == {
        (start, key.pk, member.pk, "gpt-4o"): (2, 1, 10, 5, 15),
        (start, key.pk, mix.pk, "gpt-4o"): (1, 0, 100, 1, 101),  # the group it named
        (start, key.pk, member.pk, "o3"): (1, 0, 1, 1, 2),
        (after, key.pk, member.pk, "gpt-4o"): (1, 0, 10, 5, 15),
    }
    logged = RequestLog.objects.values_list("access_key_id", flat=True)
    assert sorted(logged, key=str) == sorted([key.pk] * 6 + [None], key=str)
    # The group's own rollup is unchanged by any of this: the member and the aggregate.
    assert HourlyStat.objects.get(time=start, group_id=member.pk, model="gpt-4o").success_count == 3
    # A second batch adds to the same rows.
    write_batch([entry(member, hour + 70, key=key, tokens=(1, 2))])
    assert rollups()[(start, key.pk, member.pk, "gpt-4o")] == (3, 1, 11, 7, 18)


def test_the_usage_endpoint_matches_the_log_rows(admin_api, world):
    member, mix, key = world["member"], world["mix"], world["key"]
    other = AccessKey(name="other")
    other.issue()
    other.save()
    now = time.time()  # one instant for all: no midnight between them
    write_batch([
        entry(member, now, key=key, tokens=(300, 200)),
        entry(member, now, key=key, status=502, tokens=None),
        entry(member, now, key=key, status=429, final=False),
        entry(member, now, key=key, parent=mix, model="o3", tokens=(7, 3)),
        entry(member, now, key=other, tokens=(999, 999)),
        entry(member, now - 6),
    ])  # fmt: skip
    data = admin_api.data(admin_api.get(f"/access-keys/{key.pk}/usage"))
    finals = RequestLog.objects.filter(access_key_id=key.pk, request_type="final")
    for period, since in (("today", usage.day_start()), ("this_month", usage.month_start())):
        rows = finals.filter(timestamp__gte=since).aggregate(
            requests=Count("id"), failures=Count("id", filter=Q(is_success=False)),
            prompt_tokens=Sum("prompt_tokens"), completion_tokens=Sum("completion_tokens"),
            total_tokens=Sum("total_tokens"),
        )  # fmt: skip
        figures = {name: data[period][name] for name in rows}
        assert figures == {name: value or 0 for name, value in rows.items()}
    assert data["today"]["requests"] == 3
    assert data["today"]["total_tokens"] == 510
    assert data["limits"] == {"rpm": 7, "tpm": 0, "daily_tokens": 1000,
                              "monthly_tokens": 50_000, "max_concurrency": 0}  # fmt: skip
    assert data["remaining"] == {"daily_tokens": 490, "monthly_tokens": 49_490}
    assert (data["id"], data["name"], data["time_zone"]) == (key.pk, "billing", "UTC")
    assert data["by_group_model"] == [
        {"group_id": member.pk, "group_name": "member", "model": "gpt-4o", "requests": 2,
         "failures": 1, "prompt_tokens": 300, "completion_tokens": 200, "total_tokens": 500},
        {"group_id": mix.pk, "group_name": "mix", "model": "o3", "requests": 1, "failures": 0,
         "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    ]  # fmt: skip


def test_days_and_months_are_those_of_tz(world):
    member, key = world["member"], world["key"]
    now = datetime(2030, 3, 1, 1, 30, tzinfo=UTC)  # 10:30 on March 1st in Tokyo
    write_batch([
        entry(member, datetime(2030, 2, 28, 14, 59, tzinfo=UTC).timestamp(), key=key),  # Feb 28, 23:59
        entry(member, datetime(2030, 2, 28, 15, 1, tzinfo=UTC).timestamp(), key=key),  # Mar 1, 00:01
        entry(member, datetime(2030, 3, 1, 1, 0, tzinfo=UTC).timestamp(), key=key),
    ])  # fmt: skip
    with override_settings(TIME_ZONE="Asia/Tokyo"):
        seen = usage.usage(key, now=now)
    assert seen["time_zone"] == "Asia/Tokyo"
    assert seen["today"]["since"] == datetime(2030, 2, 28, 15, 0, tzinfo=UTC)
    assert (seen["today"]["requests"], seen["this_month"]["requests"]) == (2, 2)
    with override_settings(TIME_ZONE="UTC"):
        seen = usage.usage(key, now=now)
    assert (seen["today"]["requests"], seen["this_month"]["requests"]) == (1, 1)
    assert seen["remaining"]["daily_tokens"] == 1000 - 15


def test_retention_prunes_access_key_rollups_with_the_hourly_statistics(settings, world):
    settings.STATS_RETENTION_DAYS = 30
    now = datetime(2030, 6, 1, tzinfo=UTC)
    AccessKeyHourlyStat.objects.bulk_create([
        AccessKeyHourlyStat(hour=now - timedelta(days=age), access_key_id=world["key"].pk,
                            group_id=1, model=str(age), requests=1)
        for age in (1, 29, 31, 400)
    ])  # fmt: skip
    counts = retention.prune_logs(now)
    assert counts["access_key_hourly_stats"] == 2
    assert sorted(AccessKeyHourlyStat.objects.values_list("model", flat=True)) == ["1", "29"]
    settings.STATS_RETENTION_DAYS = 0  # keep them forever
    assert retention.prune_logs(now)["access_key_hourly_stats"] == 0
    assert AccessKeyHourlyStat.objects.count() == 2


def test_a_deleted_access_key_keeps_its_logs_and_rollups(world):
    member, key = world["member"], world["key"]
    write_batch([entry(member, time.time(), key=key)])
    key_id = key.pk
    key.delete()
    assert RequestLog.objects.get().access_key_id == key_id
    assert AccessKeyHourlyStat.objects.get().access_key_id == key_id


def test_logs_name_their_access_key_and_filter_by_it(admin_api, world, admin_client):
    member, key = world["member"], world["key"]
    write_batch([entry(member, time.time(), key=key), entry(member, time.time())])
    rows = admin_api.data(admin_api.get(f"/logs?access_key_id={key.pk}"))["items"]
    assert [row["access_key_id"] for row in rows] == [key.pk]
    everything = admin_api.data(admin_api.get("/logs?access_key_id="))["items"]
    assert sorted(row["access_key_id"] or 0 for row in everything) == [0, key.pk]
    page = admin_client.get(f"/admin/logs/requestlog/?access_key={key.pk}")
    assert page.status_code == 200
    assert page.context["cl"].result_list[0].access_key_id == key.pk
    assert len(page.context["cl"].result_list) == 1
