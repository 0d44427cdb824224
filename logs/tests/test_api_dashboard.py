"""`/api/dashboard/stats`, `/api/dashboard/chart` and `/api/dashboard/encryption-status`."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from gptload.lib.crypto import Cipher
from keys.models import APIKey, Group, GroupSubGroup
from logs import live
from logs.models import HourlyStat, RequestLog
from settings_app.models import SystemSetting

pytestmark = pytest.mark.django_db
NOW = datetime(2026, 11, 27, 16, 5, tzinfo=UTC)
HOUR = NOW.replace(minute=0)
STRONG = "Zq8v-4mP2xT9rL6wK3nB7yH5cJ1dF0sA"  # 32 characters, 30 distinct
STRONG_2 = "9fK2-pX7qL4mW8rT1vB6nC3yH5jD0sGe"
ENCRYPTION = "Ek7-Tq2mV9xP4wL8rB3nY6hC1jF5dGsZ"


@pytest.fixture(autouse=True)
def frozen_now(monkeypatch):
    monkeypatch.setattr(timezone, "now", lambda: NOW)
    monkeypatch.setattr(live, "counters", live.LiveCounters())  # this test's calls only


def use_auth_key(admin_api, settings, key: str) -> None:
    settings.AUTH_KEY = key
    admin_api.headers = {"Authorization": f"Bearer {key}"}


@pytest.fixture
def world(admin_api, settings):
    """Strong secrets everywhere; an OpenAI group in an aggregate, and a Gemini group."""
    use_auth_key(admin_api, settings, "Wm4-Hx8qN2vR6tY9pL3kD7sF1gJ5cB0e")
    settings.ENCRYPTION_KEY = ENCRYPTION
    SystemSetting.objects.update_or_create(
        setting_key="proxy_keys", defaults={"setting_value": STRONG_2}
    )
    upstreams = [{"url": "https://upstream.example", "weight": 1}]
    openai = Group.objects.create(name="openai", channel_type="openai", test_model="m",
                                  upstreams=upstreams)  # fmt: skip
    gemini = Group.objects.create(name="gemini", channel_type="gemini", test_model="m",
                                  upstreams=upstreams)  # fmt: skip
    both = Group.objects.create(name="all", channel_type="openai", group_type="aggregate")
    GroupSubGroup.objects.create(group=both, sub_group=openai, weight=1)
    return {"openai": openai, "gemini": gemini, "all": both}


def stat(group: Group, hours_ago: int, ok: int, failed: int, tokens: int = 0, model: str = "m"):
    return HourlyStat(
        time=HOUR - timedelta(hours=hours_ago), group_id=group.pk, model=model,
        success_count=ok, failure_count=failed, prompt_tokens=tokens // 4,
        completion_tokens=tokens - tokens // 4, total_tokens=tokens,
    )  # fmt: skip


def final_logs(minutes_ago: float, count: int, request_type: str = "final") -> list[RequestLog]:
    """Calls that ended `minutes_ago`: counted live (what requests per minute read) and
    logged."""
    when = NOW - timedelta(minutes=minutes_ago)
    for _ in range(count if request_type == "final" else 0):
        live.counters.note(when.timestamp(), True, 0)
    return [RequestLog(id=uuid.uuid4(), timestamp=when, status_code=200, request_type=request_type)
            for _ in range(count)]  # fmt: skip


def test_stats_count_keys_requests_errors_and_tokens(admin_api, world):
    openai, gemini, both = world["openai"], world["gemini"], world["all"]
    for n, status in enumerate(["active"] * 4 + ["invalid"] * 2 + ["cooling", "disabled"]):
        APIKey.build(openai if n % 2 else gemini, f"sk-dashboard-{n:04d}-key", status=status).save()
    RequestLog.objects.bulk_create(
        final_logs(0.5, 7) + final_logs(9.9, 5) + final_logs(12, 3) + final_logs(19.9, 1)
        + final_logs(25, 40) + final_logs(1, 9, request_type="retry")
    )  # fmt: skip
    HourlyStat.objects.bulk_create([
        # the last 24 hourly buckets, the current hour included: 90 requests, 9 failed
        stat(openai, 0, 40, 4, tokens=1000), stat(gemini, 0, 10, 1, tokens=200, model="g"),
        stat(openai, 23, 31, 4, tokens=800),
        stat(both, 0, 40, 4, tokens=1000),  # the aggregate's copy of the openai traffic
        # the 24 before them: 60 requests, 12 failed
        stat(openai, 24, 30, 6, tokens=400), stat(gemini, 47, 18, 6, tokens=100),
        stat(both, 24, 30, 6, tokens=400),
        stat(openai, 48, 500, 500), stat(openai, -1, 500, 500),  # outside both windows
    ])  # fmt: skip
    data = admin_api.data(admin_api.get("/dashboard/stats"))
    assert data["key_count"] == {
        "value": 4.0, "sub_value": 2, "sub_value_tip": "invalid keys", "trend": 0.0,
        "trend_is_growth": True, "invalid": 2, "cooling": 1, "disabled": 1,
    }  # fmt: skip
    assert data["rpm"] == {"value": 1.2, "sub_value": None, "sub_value_tip": None,
                           "trend": 200.0, "trend_is_growth": True}  # fmt: skip
    assert data["request_count"]["value"] == 90
    assert (data["request_count"]["trend"], data["request_count"]["trend_is_growth"]) == (50, True)
    assert data["error_rate"]["value"] == 10.0
    assert (data["error_rate"]["trend"], data["error_rate"]["trend_is_growth"]) == (-10.0, True)
    assert data["token_count"] == {
        "value": 2000, "sub_value": None, "sub_value_tip": None, "trend": 300.0,
        "trend_is_growth": True, "prompt_tokens": 250 + 50 + 200, "completion_tokens": 1500,
    }  # fmt: skip
    assert data["security_warnings"] == []


def test_stats_with_no_traffic_before_show_growth_from_nothing(admin_api, world):
    RequestLog.objects.bulk_create(final_logs(2, 10))
    HourlyStat.objects.bulk_create([stat(world["openai"], 3, 15, 5)])
    data = admin_api.data(admin_api.get("/dashboard/stats"))
    assert (data["rpm"]["value"], data["rpm"]["trend"]) == (1.0, 100.0)
    assert (data["request_count"]["value"], data["request_count"]["trend"]) == (20, 100.0)
    # with nothing to compare with, the error-rate trend is the rate itself: bad news
    assert data["error_rate"] == {"value": 25.0, "sub_value": None, "sub_value_tip": None,
                                  "trend": 25.0, "trend_is_growth": False}  # fmt: skip


def test_stats_on_an_empty_database(admin_api, world):
    data = admin_api.data(admin_api.get("/dashboard/stats"))
    for card in ("rpm", "request_count", "error_rate", "token_count"):
        assert (data[card]["value"], data[card]["trend"], data[card]["trend_is_growth"]) == (
            0, 0, True,
        )  # fmt: skip
    assert data["key_count"]["value"] == 0


def test_a_worse_error_rate_is_bad_news(admin_api, world):
    HourlyStat.objects.bulk_create(
        [stat(world["gemini"], 1, 8, 2), stat(world["gemini"], 30, 9, 1)]
    )
    rate = admin_api.data(admin_api.get("/dashboard/stats"))["error_rate"]
    assert (rate["value"], rate["trend"], rate["trend_is_growth"]) == (20.0, 10.0, False)


def test_weak_and_missing_secrets_are_named_but_never_quoted(admin_api, world, settings):
    use_auth_key(admin_api, settings, "admin-0123456789abcdef")
    settings.ENCRYPTION_KEY = ""
    global_keys = f"sk-short,{STRONG},{settings.AUTH_KEY},Ab3-xY7-Qw9-Zk2-Lm5"
    SystemSetting.objects.filter(setting_key="proxy_keys").update(setting_value=global_keys)
    gemini = world["gemini"]
    gemini.proxy_keys = f"{STRONG_2},aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    gemini.save()
    response = admin_api.get("/dashboard/stats")
    warnings = admin_api.data(response)["security_warnings"]
    assert [(w["type"], w["severity"]) for w in warnings] == [
        ("AUTH_KEY", "high"),  # contains 'admin'
        ("ENCRYPTION_KEY", "high"),  # not set
        ("Global proxy key #1", "high"),  # 8 characters
        ("Global proxy key #3", "high"),  # weak: it is AUTH_KEY…
        ("Global proxy key #3", "high"),  # …and the same as AUTH_KEY
        ("Global proxy key #4", "medium"),  # 19 characters, otherwise fine
        ("Proxy key #2 of group gemini", "high"),  # one repeated character
    ]
    assert "the same as AUTH_KEY" in warnings[4]["message"]
    assert "not set" in warnings[1]["message"]
    assert all(w["message"] and w["suggestion"] for w in warnings)
    text = response.content.decode()
    for secret in [settings.AUTH_KEY, "sk-short", STRONG, STRONG_2, "Ab3-xY7-Qw9-Zk2-Lm5", "aaaa"]:
        assert secret not in text


def chart(admin_api, query: str = "") -> dict:
    return admin_api.data(admin_api.get(f"/dashboard/chart{query}"))


def test_the_chart_has_24_hours_of_standard_group_traffic(admin_api, world):
    openai, gemini, both = world["openai"], world["gemini"], world["all"]
    HourlyStat.objects.bulk_create([
        stat(openai, 0, 5, 1), stat(openai, 0, 2, 0, model="other"), stat(gemini, 0, 3, 3),
        stat(both, 0, 5, 1), stat(openai, 23, 9, 4), stat(openai, 24, 100, 100),
        stat(gemini, 10, 1, 0),
    ])  # fmt: skip
    data = chart(admin_api)
    assert len(data["labels"]) == 24
    assert data["labels"][0] == "2026-11-26T17:00:00Z"
    assert data["labels"][-1] == "2026-11-27T16:00:00Z"
    ok, failed = data["datasets"]
    assert (ok["label"], failed["label"]) == ("Successful requests", "Failed requests")
    assert ok["color"] != failed["color"]
    assert (ok["data"][-1], failed["data"][-1]) == (10, 4)
    assert (ok["data"][0], failed["data"][0]) == (9, 4)
    assert (ok["data"][13], failed["data"][13]) == (1, 0)
    assert (sum(ok["data"]), sum(failed["data"])) == (20, 8)


def test_the_chart_of_one_group(admin_api, world):
    openai, gemini, both = world["openai"], world["gemini"], world["all"]
    HourlyStat.objects.bulk_create(
        [stat(openai, 2, 5, 1), stat(gemini, 2, 3, 3), stat(both, 2, 5, 1)]
    )
    ok, failed = chart(admin_api, f"?groupId={gemini.pk}")["datasets"]
    assert (ok["data"][21], failed["data"][21], sum(ok["data"])) == (3, 3, 3)
    ok, failed = chart(admin_api, f"?groupId={both.pk}")["datasets"]
    assert (ok["data"][21], failed["data"][21]) == (5, 1)  # asked for by name: shown
    assert chart(admin_api, "?groupId=")["datasets"][0]["data"][21] == 8


def test_the_chart_refuses_a_bad_or_unknown_group(admin_api, world):
    admin_api.refused(admin_api.get("/dashboard/chart?groupId=abc"), 400, "VALIDATION_FAILED")
    # Blank is "all groups", as documented; \x1c is blank to Python, not to the schema.
    admin_api.refused(admin_api.get("/dashboard/chart?groupId=%1C"), 400, "VALIDATION_FAILED")
    admin_api.refused(admin_api.get("/dashboard/chart?groupId=987654"), 404, "NOT_FOUND")


def store_keys(group: Group, cipher: Cipher, count: int) -> None:
    APIKey.objects.bulk_create([
        APIKey(group=group, key_value=cipher.encrypt(s), key_hash=cipher.hash(s))
        for s in (f"sk-sample-{n:03d}-abcdefgh" for n in range(count))
    ])  # fmt: skip


@pytest.mark.parametrize(
    ("configured", "stored_with", "scenario"),
    [
        (ENCRYPTION, ENCRYPTION, ""),
        ("", "", ""),
        (ENCRYPTION, "", "data_not_encrypted"),
        ("", ENCRYPTION, "key_not_configured"),
        (ENCRYPTION, "another-encryption-key-0000000", "key_mismatch"),
    ],
)
def test_encryption_status_detects_each_mismatch(admin_api, world, settings, configured,
                                                 stored_with, scenario):  # fmt: skip
    store_keys(world["openai"], Cipher(stored_with), 25)
    settings.ENCRYPTION_KEY = configured
    data = admin_api.data(admin_api.get("/dashboard/encryption-status"))
    assert data["has_mismatch"] is bool(scenario)
    assert data["scenario_type"] == scenario
    assert bool(data["message"]) is bool(data["suggestion"]) is bool(scenario)


def test_encryption_status_without_keys_and_with_a_few_bad_rows(admin_api, world, settings):
    settings.ENCRYPTION_KEY = ENCRYPTION
    assert admin_api.data(admin_api.get("/dashboard/encryption-status"))["has_mismatch"] is False
    store_keys(world["openai"], Cipher(ENCRYPTION), 18)
    store_keys(world["gemini"], Cipher(""), 2)  # 2 of the 20 sampled: no verdict of mismatch
    assert admin_api.data(admin_api.get("/dashboard/encryption-status"))["scenario_type"] == ""


def test_dashboard_endpoints_are_documented_and_need_the_admin_key(admin_api, client):
    paths = client.get("/api/openapi.json").json()["paths"]
    for path in (
        "/api/dashboard/stats",
        "/api/dashboard/chart",
        "/api/dashboard/encryption-status",
    ):
        assert paths[path]["get"]["description"]
        admin_api.refused(client.get(path), 401, "UNAUTHORIZED")
    assert json.dumps(paths["/api/dashboard/chart"]["get"]["parameters"]).count("groupId") >= 1
