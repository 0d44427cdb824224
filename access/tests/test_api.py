"""`/api/access-keys…`: create (the secret shown once), list, get, update, rotate, delete,
and every refusal in the API's error shape."""

from __future__ import annotations

import hashlib

import pytest
from django.db import connection
from django.utils import translation

from access.models import AccessKey
from keys.models import Group
from settings_app.models import ChangeScope, ConfigChange, ConfigVersion

pytestmark = pytest.mark.django_db
OPENAI = [{"url": "https://api.openai.com", "weight": 1}]
KEY_FIELDS = {
    "id", "name", "key_hint", "group_ids", "models", "rpm", "tpm", "daily_tokens",
    "monthly_tokens", "max_concurrency", "expires_at", "expired", "enabled", "notes",
    "created_at", "updated_at",
}  # fmt: skip


@pytest.fixture
def groups():
    standard = Group.objects.create(
        name="openai", channel_type="openai", test_model="m", upstreams=OPENAI
    )
    aggregate = Group.objects.create(name="mix", channel_type="openai", group_type="aggregate")
    return standard, aggregate


def create(admin_api, **body):
    return admin_api.data(admin_api.post("/access-keys", {"name": "ci", **body}))


def stored_row(key_id):
    """Every column of the key's row, as the database holds them."""
    with connection.cursor() as cursor:
        table = connection.ops.quote_name(AccessKey._meta.db_table)
        cursor.execute(f"SELECT * FROM {table} WHERE id = %s", [key_id])  # noqa: S608
        return " ".join(str(value) for value in cursor.fetchone())


def test_create_returns_the_secret_once_and_stores_only_its_hash(
    admin_api, groups, django_capture_on_commit_callbacks
):
    standard, aggregate = groups
    before = ConfigVersion.current()
    body = {
        "name": " billing-app ", "group_ids": [aggregate.pk, standard.pk, standard.pk],
        "models": ["gpt-4o*", "claude-*"], "rpm": 60, "tpm": 100_000,
        "daily_tokens": 1_000_000, "monthly_tokens": 2**40, "max_concurrency": 4,
        "expires_at": "2031-01-31T08:00:00+08:00", "notes": "team A",
    }  # fmt: skip
    with django_capture_on_commit_callbacks(execute=True):
        data = create(admin_api, **body)
    secret = data.pop("key")
    assert secret.startswith("gl-")
    assert set(data) == KEY_FIELDS
    assert data["name"] == "billing-app"
    assert data["group_ids"] == sorted([standard.pk, aggregate.pk])
    assert (data["models"], data["monthly_tokens"]) == (["gpt-4o*", "claude-*"], 2**40)
    assert data["expires_at"].startswith("2031-01-31T00:00:00")
    assert (data["expired"], data["enabled"]) == (False, True)
    assert data["key_hint"] == f"{secret[:4]}…{secret[-4:]}"
    row = stored_row(data["id"])
    assert secret not in row
    assert hashlib.sha256(secret.encode()).hexdigest() in row
    assert ChangeScope.ACCESS in ConfigChange.objects.filter(version__gt=before).values_list(
        "scope", flat=True
    )
    # Never again: not in a read, not in the list, and never the hash either.
    for shown in (admin_api.get(f"/access-keys/{data['id']}"), admin_api.get("/access-keys")):
        text = shown.content.decode()
        assert shown.status_code == 200
        assert secret not in text
        assert "key_hash" not in text
        assert AccessKey.objects.get().key_hash not in text


def test_list_pages_newest_first_and_filters(admin_api, groups):
    standard, _ = groups
    for n in range(5):
        create(admin_api, name=f"key-{n}", enabled=n % 2 == 0,
               group_ids=[standard.pk] if n == 4 else [])  # fmt: skip
    page = admin_api.data(admin_api.get("/access-keys?page_size=2"))
    assert [k["name"] for k in page["items"]] == ["key-4", "key-3"]
    assert page["pagination"]["total_items"] == 5
    following = admin_api.data(
        admin_api.get(f"/access-keys?page_size=2&cursor={page['pagination']['next_cursor']}")
    )
    assert [k["name"] for k in following["items"]] == ["key-2", "key-1"]
    off = admin_api.data(admin_api.get("/access-keys?enabled=false"))
    assert [k["name"] for k in off["items"]] == ["key-3", "key-1"]
    named = admin_api.data(admin_api.get("/access-keys?name=KEY-0&enabled="))
    assert [k["name"] for k in named["items"]] == ["key-0"]
    scoped = admin_api.data(admin_api.get(f"/access-keys?group_id={standard.pk}"))
    assert [(k["name"], k["group_ids"]) for k in scoped["items"]] == [("key-4", [standard.pk])]


def test_update_changes_only_what_is_sent(admin_api, groups):
    standard, aggregate = groups
    made = create(admin_api, group_ids=[standard.pk], models=["gpt-*"], rpm=10,
                  expires_at="2031-01-01T00:00:00Z")  # fmt: skip
    path = f"/access-keys/{made['id']}"
    data = admin_api.data(admin_api.put(path, {"rpm": 20, "group_ids": [aggregate.pk]}))
    assert (data["rpm"], data["group_ids"], data["models"]) == (20, [aggregate.pk], ["gpt-*"])
    assert data["expires_at"] is not None
    data = admin_api.data(admin_api.put(path, {"expires_at": None, "rpm": None, "notes": "x"}))
    assert (data["expires_at"], data["rpm"], data["notes"]) == (None, 20, "x")
    data = admin_api.data(admin_api.put(path, {"group_ids": [], "models": []}))
    assert (data["group_ids"], data["models"]) == ([], [])
    assert data["key_hint"] == made["key_hint"]  # the secret never changes on update


def test_rotate_replaces_the_secret_and_shows_the_new_one_once(admin_api):
    made = create(admin_api)
    rotated = admin_api.data(admin_api.post(f"/access-keys/{made['id']}/rotate"))
    assert rotated["key"] != made["key"]
    stored = AccessKey.objects.get()
    assert stored.key_hash == hashlib.sha256(rotated["key"].encode()).hexdigest()
    assert stored.key_hint == rotated["key_hint"] != made["key_hint"]
    assert rotated["key"] not in admin_api.get(f"/access-keys/{made['id']}").content.decode()


def test_delete_keeps_nothing_but_the_logs(admin_api):
    made = create(admin_api, name="gone")
    path = f"/access-keys/{made['id']}"
    assert admin_api.data(admin_api.delete(path)) == {"id": made["id"], "name": "gone"}
    assert not AccessKey.objects.exists()
    message = admin_api.refused(admin_api.get(path), 404, "NOT_FOUND")
    assert f"access key {made['id']} not found" == message


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({"name": "  "}, "VALIDATION_FAILED", "name"),
        ({"name": "x" * 101}, "VALIDATION_FAILED", "name"),
        ({}, "VALIDATION_FAILED", "name"),
        ({"name": "a", "rpm": -1}, "VALIDATION_FAILED", "rpm"),
        ({"name": "a", "rpm": 2**31}, "VALIDATION_FAILED", "rpm"),
        ({"name": "a", "daily_tokens": 2**63}, "VALIDATION_FAILED", "daily_tokens"),
        ({"name": "a", "rpm": "5"}, "VALIDATION_FAILED", "rpm"),
        ({"name": "a", "enabled": "yes"}, "VALIDATION_FAILED", "enabled"),
        ({"name": "a", "models": ["gpt-*", " "]}, "VALIDATION_FAILED", "Model pattern 2"),
        ({"name": "a", "models": ["x" * 201]}, "VALIDATION_FAILED", "models"),
        ({"name": "a", "models": [f"m{n}" for n in range(101)]}, "VALIDATION_FAILED", "models"),
        ({"name": "a", "models": "gpt-*"}, "VALIDATION_FAILED", "models"),
        ({"name": "a", "group_ids": [999_999]}, "VALIDATION_FAILED", "no group with id 999999"),
        ({"name": "a", "group_ids": [0]}, "VALIDATION_FAILED", "group_ids"),
        ({"name": "a", "expires_at": "soon"}, "VALIDATION_FAILED", "expires_at"),
        ({"name": "a", "expires_at": "0999-01-01T00:00:00Z"}, "VALIDATION_FAILED", "1000"),
        ({"name": "a", "expires_at": "9999-12-31T23:00:00-05:00"}, "VALIDATION_FAILED", "9998"),
        ({"name": "a", "key": "gl-mine"}, "VALIDATION_FAILED", "key"),
        ({"name": "a", "key_hash": "00"}, "VALIDATION_FAILED", "key_hash"),
    ],
)
def test_bad_input_is_refused_in_the_api_shape(admin_api, body, code, words):
    message = admin_api.refused(admin_api.post("/access-keys", body), 400, code)
    assert words in message
    assert not AccessKey.objects.exists()


def test_refusals_of_an_update_and_of_unknown_keys(admin_api):
    made = create(admin_api)
    path = f"/access-keys/{made['id']}"
    assert "name" in admin_api.refused(admin_api.put(path, {"name": ""}), 400, "VALIDATION_FAILED")
    assert "key" in admin_api.refused(
        admin_api.put(path, {"key": "gl-x"}), 400, "VALIDATION_FAILED"
    )
    for call in (
        lambda: admin_api.get("/access-keys/424242"),
        lambda: admin_api.put("/access-keys/424242", {"rpm": 1}),
        lambda: admin_api.post("/access-keys/424242/rotate"),
        lambda: admin_api.delete("/access-keys/424242"),
        lambda: admin_api.get("/access-keys/424242/usage"),
        lambda: admin_api.get(f"/access-keys/{2**70}"),
    ):
        admin_api.refused(call(), 404, "NOT_FOUND")
    admin_api.refused(admin_api.get("/access-keys/abc"), 400, "VALIDATION_FAILED")
    bad = admin_api.client.post(
        "/api/access-keys", data="{", content_type="application/json", headers=admin_api.headers
    )
    admin_api.refused(bad, 400, "INVALID_JSON")
    assert AccessKey.objects.get().name == "ci"


def test_the_api_needs_the_admin_key(client):
    response = client.get("/api/access-keys")
    assert response.status_code == 401
    assert response.json()["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize(
    ("language", "words"),
    [("zh-CN", "未找到访问密钥 424242"), ("ja", "アクセスキー 424242 が見つかりません")],
)
def test_refusals_speak_the_callers_language(admin_api, language, words):
    try:
        answer = admin_api.get("/access-keys/424242", headers={"Accept-Language": language})
        assert admin_api.refused(answer, 404, "NOT_FOUND") == words
    finally:
        # LocaleMiddleware leaves the request's language active in this thread.
        translation.deactivate()
