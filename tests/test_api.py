"""The management API's frame: auth, envelopes, errors, docs and the system endpoints."""

from __future__ import annotations

import codecs
import json

import pytest
from django.contrib.auth.models import User
from django.db import DataError
from django.test import Client

from conftest import ADMIN_KEY
from keys import groups
from keys.models import APIKey, Group, KeyJob
from settings_app.models import SystemSetting

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {ADMIN_KEY}"},
        {"X-Api-Key": ADMIN_KEY},
        {"X-Goog-Api-Key": ADMIN_KEY},
    ],
)
def test_the_admin_key_is_accepted_in_any_header(admin_api, client, headers):
    response = client.get("/api/channel-types", headers=headers)
    assert admin_api.data(response) == ["openai", "openai-response", "gemini", "anthropic"]


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/api/channel-types", {}),
        ("/api/channel-types", {"Authorization": "Bearer sk-wrong"}),
        (f"/api/channel-types?key={ADMIN_KEY}", {}),
    ],
)
def test_missing_wrong_or_query_keys_are_refused(admin_api, client, path, headers):
    admin_api.refused(client.get(path, headers=headers), 401, "UNAUTHORIZED")


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/api/groups"), ("post", "/api/groups"), ("put", "/api/groups/1"),
     ("delete", "/api/groups/1")],
)  # fmt: skip
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"X-Api-Key": "x"}])
def test_a_wrong_or_missing_key_is_401_on_every_method_not_a_csrf_refusal(
    admin_api, method, path, headers
):
    client = Client(enforce_csrf_checks=True)
    body = {} if method == "get" else {"content_type": "application/json", "data": "{}"}
    response = getattr(client, method)(path, headers=headers, **body)
    admin_api.refused(response, 401, "UNAUTHORIZED")


def test_a_staff_session_without_its_csrf_token_is_told_what_to_send(admin_api):
    staff = User.objects.create_user("ops", password="pw-0123456789", is_staff=True)
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)
    response = client.put("/api/settings", {"max_retries": 2}, content_type="application/json")
    assert response.status_code == 403
    assert "X-CSRFToken" in response.json()["message"]


def test_a_staff_session_works_and_needs_csrf_for_changes(admin_api, client):
    staff = User.objects.create_user("ops", password="pw-0123456789", is_staff=True)
    client.force_login(staff)
    assert admin_api.data(client.get("/api/channel-types"))
    csrf_client = type(client)(enforce_csrf_checks=True)
    csrf_client.force_login(staff)
    response = csrf_client.post(
        "/api/auth/login", {"auth_key": "x"}, content_type="application/json"
    )
    assert response.status_code == 401  # login needs no auth; CSRF is not asked there
    User.objects.create_user("guest", password="pw-0123456789")
    client.force_login(User.objects.get(username="guest"))
    admin_api.refused(client.get("/api/channel-types"), 401, "UNAUTHORIZED")


def test_login_checks_the_admin_key(admin_api):
    ok = admin_api.post("/auth/login", {"auth_key": ADMIN_KEY}, headers={"Authorization": ""})
    assert ok.json() == {"success": True, "message": "Authentication successful"}
    bad = admin_api.post("/auth/login", {"auth_key": "nope"})
    assert (bad.status_code, bad.json()["success"]) == (401, False)


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ('{"auth_key": ', "INVALID_JSON", "not valid JSON"),
        ('{"auth_key": 5}', "VALIDATION_FAILED", "auth_key"),
        ("{}", "VALIDATION_FAILED", "auth_key: Field required"),
    ],
)
def test_bad_bodies_get_a_400_that_says_what_to_fix(admin_api, client, body, code, words):
    response = client.post("/api/auth/login", body, content_type="application/json")
    assert words in admin_api.refused(response, 400, code)


def test_unknown_paths_and_methods_answer_in_the_error_shape(admin_api):
    admin_api.refused(admin_api.get("/no-such-thing"), 404, "NOT_FOUND")
    response = admin_api.put("/channel-types", {})
    assert response.status_code == 405


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/api/groups", '{"name": "a\\ud800", "channel_type": "openai"}'),
        ("put", "/api/groups/{g}", '{"display_name": "a\\ud800"}'),
        ("post", "/api/keys/add-multiple", '{"group_id": {g}, "keys_text": "sk-\\udfff-1"}'),
        ("post", "/api/keys/add-async", '{"group_id": {g}, "keys_text": "sk-\\udfff-1"}'),
        ("put", "/api/settings", '{"proxy_keys": "sk-\\ud800"}'),
        ("put", "/api/settings", '{"max_retries": NaN}'),
    ],
)
def test_json_no_database_can_store_is_refused_and_nothing_changes(
    admin_api, client, method, path, body
):
    # A lone surrogate escape parsed, then failed to encode at the INSERT: a 500.
    group = Group.objects.create(name="g", channel_type="openai")
    settings_before = list(SystemSetting.objects.values_list("setting_key", "setting_value"))
    path, body = path.replace("{g}", str(group.pk)), body.replace("{g}", str(group.pk))
    response = getattr(client, method)(path, body, content_type="application/json",
                                       headers=admin_api.headers)  # fmt: skip
    admin_api.refused(response, 400, "INVALID_JSON")
    assert list(Group.objects.values_list("name", "display_name")) == [("g", "")]
    assert not APIKey.objects.exists()
    assert not KeyJob.objects.exists()
    assert list(SystemSetting.objects.values_list("setting_key", "setting_value")) == (
        settings_before
    )


def test_a_json_body_may_start_with_a_bom(admin_api, client):
    body = codecs.BOM_UTF8 + json.dumps({"auth_key": ADMIN_KEY}).encode()
    response = client.post("/api/auth/login", body, content_type="application/json")
    assert response.json() == {"success": True, "message": "Authentication successful"}


@pytest.mark.parametrize(
    ("method", "path"),
    [("put", "/api/keys/abc/notes"), ("post", "/api/nowhere"), ("get", "/api/keys/%0Aabc")],
)
def test_a_path_without_endpoint_is_a_json_404_whatever_the_method(admin_api, method, path):
    # Found by the fuzzer: a PUT there met Django's CSRF check (an HTML 403), and a path
    # with a newline slipped past the catch-all (an HTML 404).
    client = Client(enforce_csrf_checks=True)
    response = getattr(client, method)(path, headers=admin_api.headers)
    assert "No API endpoint" in admin_api.refused(response, 404, "NOT_FOUND")


def test_a_query_parameter_sent_twice_is_refused(admin_api):
    response = admin_api.get("/dashboard/chart?groupId=1&groupId=2")
    assert "groupId: sent 2 times" in admin_api.refused(response, 400, "BAD_REQUEST")


def test_too_many_query_parameters_are_a_400(admin_api):
    # Django's limit (DATA_UPLOAD_MAX_NUMBER_FIELDS) raises while reading them: was a 500.
    query = "&".join(f"p{n}=1" for n in range(1001))
    assert "parameters" in admin_api.refused(admin_api.get(f"/logs?{query}"), 400, "BAD_REQUEST")


def test_a_value_the_database_refuses_is_a_400(admin_api, monkeypatch):
    # What MySQL's strict mode raises for a value a schema let through (too long, out of
    # range): the client's to fix, so not a 500.
    def refuse(items):
        raise DataError("(1264, \"Out of range value for column 'sort' at row 1\")")

    monkeypatch.setattr(groups, "reorder", refuse)
    group = Group.objects.create(name="g", channel_type="openai")
    response = admin_api.put("/groups/reorder", {"items": [{"id": group.pk, "sort": 1}]})
    assert "out of range" in admin_api.refused(response, 400, "VALIDATION_FAILED")


def test_every_operation_documents_its_refusals(client):
    paths = client.get("/api/openapi.json").json()["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            refusal = operation["responses"]["4XX"]["content"]["application/json"]["schema"]
            assert refusal["required"] == ["code", "message"], (method, path)


def test_the_docs_and_schema_are_served(client):
    assert client.get("/api/docs").status_code == 200
    schema = client.get("/api/openapi.json").json()
    assert "/api/auth/login" in schema["paths"]


def test_integration_info_lists_the_groups_a_proxy_key_opens(admin_api, client):
    Group.objects.create(name="mine", channel_type="openai", proxy_keys="sk-group-key-1")
    Group.objects.create(name="other", channel_type="gemini", proxy_keys="sk-group-key-2")
    response = client.get("/api/integration/info?key=sk-group-key-1")
    assert admin_api.data(response) == [
        {"name": "mine", "display_name": "mine", "channel_type": "openai", "path": "/proxy/mine"}
    ]
    admin_api.refused(client.get("/api/integration/info?key=nope"), 400, "BAD_REQUEST")
