"""A method an `/api/` endpoint does not take: 405 in the API's error shape, not ninja's
bare text, with the methods it does take."""

from __future__ import annotations

import pytest

from conftest import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("delete", "/api/channel-types", {"GET"}),
        ("patch", "/api/groups", {"GET", "POST"}),
        ("get", "/api/auth/login", {"POST"}),
        ("post", "/api/groups/1", {"GET", "PUT", "DELETE"}),
        ("get", "/api/groups/reorder", {"PUT"}),
    ],
)
@pytest.mark.django_db
def test_a_wrong_method_answers_405_in_the_api_shape(admin_api, client, method, path, allowed):
    for headers in (ADMIN, {}):  # before any authentication
        response = getattr(client, method)(path, headers=headers)
        assert response.status_code == 405
        assert response["Content-Type"].startswith("application/json")
        body = response.json()
        assert body["code"] == "METHOD_NOT_ALLOWED"
        assert method.upper() in body["message"]
        assert path in body["message"]
        assert set(response["Allow"].replace(" ", "").split(",")) == allowed


@pytest.mark.django_db
def test_the_405_message_is_in_the_callers_language(client):
    response = client.delete("/api/channel-types", headers={"Accept-Language": "zh-CN"})
    assert response.json()["message"] == "/api/channel-types 不支持 DELETE 方法；请使用 GET。"
    response = client.delete("/api/channel-types", headers={"Accept-Language": "ja"})
    assert "使えません" in response.json()["message"]


@pytest.mark.django_db
def test_errors_outside_the_api_keep_their_own_shape(client):
    assert client.post("/health")["Content-Type"].startswith("text/html")
