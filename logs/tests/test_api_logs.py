"""`GET /api/logs` and `GET /api/logs/export`: filters, decryption, paging, the CSV."""

from __future__ import annotations

import csv
import io
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.test import AsyncClient
from django.utils.http import urlencode

from conftest import ADMIN_KEY
from gptload.lib.crypto import Cipher
from logs import api as logs_api
from logs.models import RequestLog

pytestmark = pytest.mark.django_db
ENCRYPTION = "log-api-encryption-key-0123456789"
NOW = datetime(2026, 11, 27, 16, 5, tzinfo=UTC)
KEY_A, KEY_B, KEY_C = "sk-alpha-000000000001", "sk-bravo-000000000002", "sk-charlie-00000003"


def at(minutes_ago: float) -> datetime:
    return NOW - timedelta(minutes=minutes_ago)


def entry(name: str, minutes_ago: float, key: str = KEY_A, **fields) -> RequestLog:
    cipher = Cipher(ENCRYPTION)
    defaults = {
        "timestamp": at(minutes_ago), "group_id": 1, "group_name": "openai-main",
        "key_value": cipher.encrypt(key) if key else "", "key_hash": cipher.hash(key) if key else "",
        "model": "gpt-4.1-mini", "is_success": True, "status_code": 200,
        "source_ip": "203.0.113.7", "request_type": "final", "duration_ms": 120,
        "request_path": "/proxy/openai-main/v1/chat/completions",
        "upstream_addr": "https://api.openai.com/v1/chat/completions",
    }  # fmt: skip
    defaults.update(fields)
    return RequestLog(id=uuid.uuid5(uuid.NAMESPACE_URL, name), **defaults)


def uid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


@pytest.fixture
def logs(settings):
    """Six attempts: two through an aggregate, one retry, failures, one without a key."""
    settings.ENCRYPTION_KEY = ENCRYPTION
    RequestLog.objects.bulk_create([
        entry("ok-old", 300, prompt_tokens=10, completion_tokens=5, total_tokens=15),
        entry("retry-401", 60, KEY_B, is_success=False, status_code=401, request_type="retry",
              error_message="Incorrect API key provided"),
        entry("final-after-retry", 59.9, KEY_C, parent_group_id=9, parent_group_name="all-in-one",
              model="GPT-4o", is_stream=True),
        entry("gemini-429", 30, KEY_B, group_id=2, group_name="gemini-pool",
              model="gemini-2.0-flash", is_success=False, status_code=429,
              error_message="Resource has been exhausted", source_ip="198.51.100.4"),
        entry("no-key-503", 10, "", is_success=False, status_code=503,
              error_message="no active keys"),
        entry("latest-401", 1, KEY_B, is_success=False, status_code=401,
              parent_group_id=9, parent_group_name="all-in-one",
              error_message="Incorrect API key provided", request_body='{"model": "x"}'),
    ])  # fmt: skip


def listed(admin_api, **params) -> list[str]:
    query = f"?{urlencode(params)}" if params else ""
    page = admin_api.data(admin_api.get(f"/logs{query}"))
    return [row["id"] for row in page["items"]]


def test_logs_come_newest_first_with_every_field_and_the_key_in_plaintext(admin_api, logs):
    page = admin_api.data(admin_api.get("/logs"))
    assert page["pagination"] == {"page": 1, "page_size": 15, "total_items": 6, "total_pages": 1,
                                  "total_exact": True, "next_cursor": None}  # fmt: skip
    assert [row["id"] for row in page["items"]] == [
        uid("latest-401"), uid("no-key-503"), uid("gemini-429"), uid("final-after-retry"),
        uid("retry-401"), uid("ok-old"),
    ]  # fmt: skip
    latest = page["items"][0]
    model_fields = {f.attname for f in RequestLog._meta.concrete_fields}
    assert set(latest) == model_fields | {"masked_key"}
    assert latest["key_value"] == latest["masked_key"] == "sk-b…0002"  # never the whole key
    assert KEY_B not in str(page)
    assert latest["key_hash"] == Cipher(ENCRYPTION).hash(KEY_B)
    assert (latest["status_code"], latest["is_success"], latest["request_type"]) == (
        401, False, "final",
    )  # fmt: skip
    assert latest["parent_group_name"] == "all-in-one"
    assert latest["request_body"] == '{"model": "x"}'
    assert datetime.fromisoformat(latest["timestamp"]) == at(1)
    old = page["items"][-1]
    assert (old["prompt_tokens"], old["completion_tokens"], old["total_tokens"]) == (10, 5, 15)
    no_key = page["items"][1]
    assert (no_key["key_value"], no_key["masked_key"]) == ("", "")


def test_a_page_past_the_end_is_empty_however_far(admin_api, logs):
    # Found by probing past the fuzzer: an OFFSET of 2^63 was a 409 (SQLite's "datatype
    # mismatch" taken for a duplicate row) and a 500 on MySQL.
    page = admin_api.data(admin_api.get(f"/logs?page={2**63}&page_size=1000"))
    assert page == {"items": [], "pagination": {"page": 2**63, "page_size": 1000,
                                                "total_items": 6, "total_pages": 1,
                                                "total_exact": True, "next_cursor": None}}  # fmt: skip


def test_a_parameter_sent_twice_is_refused(admin_api, logs):
    # Found by the fuzzer: the last one silently won.
    response = admin_api.get("/logs?group_name=main&group_name=gemini")
    assert "group_name: sent 2 times" in admin_api.refused(response, 400, "BAD_REQUEST")


def test_pages_split_the_newest_first_order(admin_api, logs):
    page = admin_api.data(admin_api.get("/logs?page=2&page_size=4"))
    assert page["pagination"] == {"page": 2, "page_size": 4, "total_items": 6, "total_pages": 2,
                                  "total_exact": True, "next_cursor": None}  # fmt: skip
    assert [row["id"] for row in page["items"]] == [uid("retry-401"), uid("ok-old")]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"group_name": "GEMINI"}, ["gemini-429"]),
        ({"group_name": "main"}, ["latest-401", "no-key-503", "final-after-retry", "retry-401",
                                  "ok-old"]),
        ({"parent_group_name": "all-in"}, ["latest-401", "final-after-retry"]),
        ({"model": "gpt-4o"}, ["final-after-retry"]),
        ({"key_value": KEY_B}, ["latest-401", "gemini-429", "retry-401"]),
        ({"key_value": f"  {KEY_C} "}, ["final-after-retry"]),
        ({"key_value": "sk-not-a-logged-key"}, []),
        ({"is_success": "true"}, ["final-after-retry", "ok-old"]),
        ({"is_success": "false", "request_type": "final"}, ["latest-401", "no-key-503",
                                                              "gemini-429"]),
        ({"request_type": "retry"}, ["retry-401"]),
        ({"status_code": "401"}, ["latest-401", "retry-401"]),
        ({"source_ip": "198.51.100.4"}, ["gemini-429"]),
        ({"error_contains": "INCORRECT api"}, ["latest-401", "retry-401"]),
        ({"start_time": "2026-11-27T15:05:03Z", "end_time": "2026-11-27T15:36:00Z"},
         ["gemini-429", "final-after-retry"]),
        ({"start_time": "2026-11-27T23:55:00+08:00"}, ["latest-401", "no-key-503"]),
        ({"start_time": "2026-11-27T23:55:00 08:00"}, ["latest-401", "no-key-503"]),
        ({"end_time": "2026-11-27T11:05:00+00:00"}, ["ok-old"]),
        ({"start_time": "2026-11-27T16:04:00.000000+00:00"}, ["latest-401"]),
        ({"status_code": "", "model": "", "is_success": " "}, ["latest-401", "no-key-503",
                                                               "gemini-429", "final-after-retry",
                                                               "retry-401", "ok-old"]),
        ({"group_name": "main", "status_code": "401", "request_type": "final"}, ["latest-401"]),
    ],
)  # fmt: skip
def test_each_filter_narrows_the_list(admin_api, logs, params, expected):
    assert listed(admin_api, **params) == [uid(name) for name in expected]


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"start_time": "yesterday"}, "start_time"),
        ({"end_time": "2026-13-01T00:00:00Z"}, "end_time"),
        ({"start_time": "0001-01-01T00:00:00+05:00"}, "start_time"),
        ({"end_time": "9999-12-31T23:59:59-05:00"}, "end_time"),
        ({"start_time": "2026-11-27T16:00:00Z", "end_time": "2026-11-27T15:00:00Z"},
         "start_time must not be later than end_time"),
        ({"is_success": "maybe"}, "is_success"),
        ({"request_type": "first"}, "request_type"),
        ({"status_code": "four-oh-one"}, "status_code"),
        ({"status_code": "42"}, "status_code"),
        ({"page_size": "1001"}, "page_size"),
        ({"page_size": "1000000000"}, "page_size"),
        ({"page": "0"}, "page"),
        # Python takes \x1c for white space, the documented pattern (JSON Schema) does not.
        ({"status_code": "\x1c"}, "status_code"),
        ({"request_type": "\x1c"}, "request_type"),
    ],
)  # fmt: skip
def test_bad_filters_are_refused_naming_the_parameter(admin_api, logs, params, words):
    response = admin_api.get(f"/logs?{urlencode(params)}")
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] in ("BAD_REQUEST", "VALIDATION_FAILED")
    assert words in body["message"]


def test_a_time_without_offset_is_read_in_the_servers_time_zone(admin_api, logs, settings):
    settings.TIME_ZONE = "Asia/Shanghai"
    assert listed(admin_api, end_time="2026-11-27T19:05:00") == [uid("ok-old")]
    assert listed(admin_api, end_time="2026-11-27T19:04:59") == []


def test_a_key_logged_under_another_encryption_key_shows_failed_to_decrypt(admin_api, settings):
    settings.ENCRYPTION_KEY = ENCRYPTION
    foreign = Cipher("some-other-encryption-key-4567")
    RequestLog.objects.bulk_create([
        entry("foreign", 1, key="", key_value=foreign.encrypt(KEY_A), key_hash=foreign.hash(KEY_A))
    ])  # fmt: skip
    (row,) = admin_api.data(admin_api.get("/logs"))["items"]
    assert (row["key_value"], row["masked_key"]) == ("failed-to-decrypt", "failed-to-decrypt")


def test_logs_need_the_admin_key(admin_api, client, logs):
    admin_api.refused(client.get("/api/logs"), 401, "UNAUTHORIZED")
    admin_api.refused(client.get("/api/logs/export"), 401, "UNAUTHORIZED")


def export_rows(response) -> list[list[str]]:
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert re.fullmatch(
        r'attachment; filename="log_keys_export_\d{14}\.csv"', response["Content-Disposition"]
    )
    text = b"".join(response.streaming_content).decode()
    return list(csv.reader(io.StringIO(text)))


def test_export_lists_each_key_once_with_its_newest_log(admin_api, logs):
    rows = export_rows(admin_api.get("/logs/export"))
    assert rows[0] == ["key_value", "group_name", "status_code"]
    assert sorted(rows[1:]) == sorted([
        [KEY_A, "openai-main", "200"],
        [KEY_B, "openai-main", "401"],  # the 1-minute-old row, not the 429 of gemini-pool
        [KEY_C, "openai-main", "200"],
    ])  # fmt: skip


def test_export_applies_the_filters_before_picking_the_newest_row(admin_api, logs):
    rows = export_rows(admin_api.get("/logs/export?group_name=gemini"))
    assert rows[1:] == [[KEY_B, "gemini-pool", "429"]]
    rows = export_rows(admin_api.get("/logs/export?status_code=401&request_type=retry"))
    assert rows[1:] == [[KEY_B, "openai-main", "401"]]
    rows = export_rows(admin_api.get("/logs/export?status_code=418"))
    assert rows == [["key_value", "group_name", "status_code"]]


def test_export_refuses_a_bad_filter(admin_api, logs):
    message = admin_api.refused(admin_api.get("/logs/export?end_time=soon"), 400, "BAD_REQUEST")
    assert "end_time" in message


def test_export_reads_keys_in_batches(admin_api, settings, monkeypatch):
    settings.ENCRYPTION_KEY = ENCRYPTION
    monkeypatch.setattr(logs_api, "EXPORT_BATCH", 3)
    keys = [f"sk-batch-key-{n:04d}-xxxxxxxx" for n in range(8)]
    RequestLog.objects.bulk_create(
        [entry(f"old-{k}", 20, k, status_code=500) for k in keys]
        + [entry(f"new-{k}", 5, k, status_code=200 + n) for n, k in enumerate(keys)]
    )
    rows = export_rows(admin_api.get("/logs/export"))
    assert sorted(rows[1:]) == sorted([k, "openai-main", str(200 + n)] for n, k in enumerate(keys))


@pytest.mark.django_db(transaction=True)
async def test_export_streams_batch_by_batch_under_asgi(settings, monkeypatch):
    settings.AUTH_KEY = ADMIN_KEY
    settings.ENCRYPTION_KEY = ENCRYPTION
    monkeypatch.setattr(logs_api, "EXPORT_BATCH", 2)
    keys = [f"sk-async-key-{n:04d}-xxxxxxxx" for n in range(5)]
    await RequestLog.objects.abulk_create([entry(k, n, k) for n, k in enumerate(keys)])
    response = await AsyncClient().get(
        "/api/logs/export", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert response.status_code == 200
    chunks = [chunk async for chunk in response.streaming_content]  # type: ignore[attr-defined]
    assert len(chunks) == 1 + 3  # the header, then one chunk per batch of two keys
    rows = list(csv.reader(io.StringIO(b"".join(chunks).decode())))
    assert sorted(r[0] for r in rows[1:]) == keys


def test_the_logs_endpoints_are_documented(client):
    paths = client.get("/api/openapi.json").json()["paths"]
    listing = paths["/api/logs"]["get"]
    assert {p["name"] for p in listing["parameters"]} >= {
        "group_name", "parent_group_name", "key_value", "model", "is_success", "request_type",
        "status_code", "source_ip", "error_contains", "start_time", "end_time", "page",
        "page_size",
    }  # fmt: skip
    assert "text/csv" in paths["/api/logs/export"]["get"]["responses"]["200"]["content"]
