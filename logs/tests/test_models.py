from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.db import IntegrityError, transaction

from keys.models import Group
from logs.models import HourlyStat, RequestLog, RequestType

pytestmark = pytest.mark.django_db
NOW = datetime(2026, 11, 27, 16, 5, tzinfo=UTC)


def test_a_log_row_keeps_every_field_and_survives_its_group():
    group = Group.objects.create(
        name="g",
        channel_type="openai",
        test_model="m",
        upstreams=[{"url": "https://x.example", "weight": 1}],
    )
    RequestLog.objects.create(
        timestamp=NOW, group_id=group.pk, group_name="g", status_code=200, is_success=True,
        model="gpt-4.1", request_type=RequestType.FINAL, is_stream=True, duration_ms=812,
        prompt_tokens=12, completion_tokens=30, total_tokens=42, request_path="/proxy/g/v1/chat/completions",
        upstream_addr="https://x.example/v1/chat/completions", source_ip="203.0.113.9",
        error_message="ü" * 3000,
    )  # fmt: skip
    group.delete()
    row = RequestLog.objects.get()
    assert (row.group_name, row.total_tokens, row.is_stream) == ("g", 42, True)
    assert len(row.error_message) == 3000
    assert len(str(row.id)) == 36


def test_hourly_stats_are_unique_per_hour_group_and_model():
    hour = NOW.replace(minute=0)
    HourlyStat.objects.create(time=hour, group_id=1, model="m", success_count=3, failure_count=1)
    assert HourlyStat.objects.get().request_count == 4
    HourlyStat.objects.create(time=hour, group_id=1, model="other")
    with pytest.raises(IntegrityError), transaction.atomic():
        HourlyStat.objects.create(time=hour, group_id=1, model="m")
