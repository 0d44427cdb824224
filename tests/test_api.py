"""The management API's frame: auth, envelopes, errors, docs and the system endpoints."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User

from conftest import ADMIN_KEY
from keys.models import Group

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
