"""Log retention at scale: short DELETEs of index ranges, never one for every old row."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from logs import retention
from logs.models import RequestLog

pytestmark = pytest.mark.django_db


def test_old_logs_go_in_deletes_of_a_batch_each_and_newer_rows_stay(monkeypatch):
    now = timezone.now()
    monkeypatch.setattr(retention, "BATCH", 4)
    monkeypatch.setattr(retention, "SMALLEST", 1)
    old = [
        RequestLog(timestamp=now - timedelta(days=8, minutes=n), status_code=500) for n in range(10)
    ]
    kept = [
        RequestLog(timestamp=now - timedelta(days=6, minutes=n), status_code=200) for n in range(3)
    ]
    RequestLog.objects.bulk_create(old + kept)
    with CaptureQueriesContext(connection) as queries:
        assert retention.delete_before(RequestLog, "timestamp", now - timedelta(days=7)) == 10
    deletes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 2  # 4 rows, then 6 of up to 8 (quick: twice as many), oldest first
    assert all(" IN (" not in sql for sql in deletes)  # ranges of the index, not id lists
    assert sorted(RequestLog.objects.values_list("id", flat=True)) == sorted(r.id for r in kept)


def test_a_batch_takes_the_oldest_rows_first(monkeypatch):
    now = timezone.now()
    monkeypatch.setattr(retention, "BATCH", 2)
    ages = [9, 30, 8, 12]
    RequestLog.objects.bulk_create(
        [RequestLog(timestamp=now - timedelta(days=d), status_code=d) for d in ages]
    )
    assert retention.delete_batch(RequestLog, "timestamp", now - timedelta(days=7)) == 2
    assert sorted(RequestLog.objects.values_list("status_code", flat=True)) == [8, 9]


def test_each_batch_is_sized_to_take_about_the_aim():
    aim = retention.AIM
    assert retention.next_size(500, aim * 2) == 250  # slow: half as many
    assert retention.next_size(500, aim / 10) == 1000  # quick: at most twice as many
    assert retention.next_size(500, 100.0) == retention.SMALLEST
    assert retention.next_size(retention.LARGEST, 0.001) == retention.LARGEST
