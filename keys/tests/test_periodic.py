"""The periodic jobs on real rows: due validations, cooling expiry, log retention, schedules."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from gptload.celery import app as celery_app
from keys import jobs, periodic
from keys.models import APIKey, Group, GroupType, JobKind, JobStatus, KeyJob, KeyStatus
from logs import retention
from logs.models import HourlyStat, RequestLog
from settings_app.models import SystemSetting

pytestmark = pytest.mark.django_db


def group(name: str, *, keys: dict[str, str], **fields) -> Group:
    made = Group.objects.create(name=name, channel_type="openai", test_model="m",
                                upstreams=[{"url": "https://up.example", "weight": 1}], **fields)  # fmt: skip
    for secret, status in keys.items():
        APIKey.build(made, secret, status=status).save()
    return made


def test_only_groups_that_are_due_get_a_validation_job():
    now = timezone.now()
    due = group("due", keys={"a1": KeyStatus.INVALID, "a2": KeyStatus.ACTIVE})
    group("recent", keys={"b1": KeyStatus.INVALID}, last_validated_at=now - timedelta(minutes=10))
    short = group("short", keys={"c1": KeyStatus.INVALID}, config={"key_validation_interval_minutes": 5},
                  last_validated_at=now - timedelta(minutes=10))  # fmt: skip
    clean = group("clean", keys={"d1": KeyStatus.ACTIVE})
    group("off", keys={"e1": KeyStatus.INVALID}, enabled=False)
    busy = group("busy", keys={"f1": KeyStatus.INVALID})
    jobs.create(busy, JobKind.IMPORT, keys=["sk-x"])
    Group.objects.create(name="agg", group_type=GroupType.AGGREGATE, channel_type="openai")
    assert sorted(periodic.validate_due_groups(now)) == ["due", "short"]
    queued = KeyJob.objects.filter(kind=JobKind.VALIDATE)
    assert sorted(j.group_id for j in queued) == sorted([due.pk, short.pk])
    assert {j.status for j in queued} == {JobStatus.PENDING}
    assert [j.params for j in queued] == [{"statuses": ["invalid"]}] * 2
    clean.refresh_from_db()
    assert clean.last_validated_at == now  # nothing to validate: the clock restarts


def test_expired_cooling_is_stored_as_active():
    now = timezone.now()
    g = group("g", keys={})
    ended = APIKey.build(
        g, "k1", status=KeyStatus.COOLING, cooling_until=now - timedelta(seconds=1)
    )
    running = APIKey.build(
        g, "k2", status=KeyStatus.COOLING, cooling_until=now + timedelta(minutes=1)
    )
    APIKey.objects.bulk_create([ended, running])
    assert periodic.expire_cooling(now) == 1
    assert dict(APIKey.objects.values_list("key_hash", "status")) == {
        ended.key_hash: KeyStatus.ACTIVE, running.key_hash: KeyStatus.COOLING,
    }  # fmt: skip
    assert APIKey.objects.get(key_hash=ended.key_hash).cooling_until is None


def test_logs_past_retention_are_deleted_in_batches(monkeypatch):
    now = timezone.now()
    monkeypatch.setattr(retention, "BATCH", 3)
    rows = [RequestLog(timestamp=now - timedelta(days=age, hours=1), status_code=200)
            for age in (0, 1, 6, 7, 8, 30, 30, 30, 400)]  # fmt: skip
    RequestLog.objects.bulk_create(rows)
    HourlyStat.objects.bulk_create([HourlyStat(time=now - timedelta(days=d), group_id=1, model=str(d))
                                    for d in (1, 399, 401)])  # fmt: skip
    assert retention.prune_logs(now) == {
        "request_logs": 6, "hourly_stats": 1, "access_key_hourly_stats": 0,
    }  # fmt: skip
    assert RequestLog.objects.count() == 3
    assert sorted(HourlyStat.objects.values_list("model", flat=True)) == ["1", "399"]
    SystemSetting.objects.create(setting_key="request_log_retention_days", setting_value="0")
    RequestLog.objects.bulk_create([RequestLog(timestamp=now - timedelta(days=900), status_code=1)])
    assert retention.prune_logs(now)["request_logs"] == 0  # 0 keeps them forever


def test_default_schedules_exist_and_name_real_tasks():
    tasks = dict(PeriodicTask.objects.values_list("task", "interval__every"))
    assert tasks == {
        "keys.tasks.validate_due_groups": 5,
        "keys.tasks.expire_cooling": 1,
        "logs.tasks.prune_logs": 1,
        "keys.tasks.recount_keys": 1,
    }
    celery_app.loader.import_default_modules()
    assert set(tasks) <= set(celery_app.tasks)
