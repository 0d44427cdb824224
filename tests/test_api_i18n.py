"""`/api` messages follow the caller's `Accept-Language` (English, Simplified Chinese,
Japanese), as GPT-Load's do; `code` never changes with the language."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.test import Client
from django.utils import translation

from keys.models import Group

pytestmark = pytest.mark.django_db
ZH = {"HTTP_ACCEPT_LANGUAGE": "zh-CN,zh;q=0.9"}
JA = {"HTTP_ACCEPT_LANGUAGE": "ja-JP"}
ADMIN_KEY = "sk-i18n-test-key-0123456789abcdef"


@pytest.fixture(autouse=True)
def _english_afterwards() -> Iterator[None]:
    # LocaleMiddleware leaves the request's language active in this thread: later tests
    # that call services directly must not get Chinese or Japanese refusals.
    yield
    translation.deactivate()


@pytest.fixture
def api(client: Client, settings) -> Client:
    settings.AUTH_KEY = ADMIN_KEY
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {ADMIN_KEY}"
    return client


def envelope(response, status: int) -> dict:
    assert response.status_code == status, response.content
    return response.json()


def test_a_success_says_so_in_the_callers_language(api):
    assert envelope(api.get("/api/channel-types"), 200)["message"] == "success"
    assert envelope(api.get("/api/channel-types", **ZH), 200)["message"] == "成功"
    assert envelope(api.get("/api/channel-types", **JA), 200)["message"] == "成功"


def test_a_data_message_is_translated_with_its_count(api):
    group = Group.objects.create(name="team", upstreams=[{"url": "https://x.test", "weight": 1}])
    body = {"group_id": group.pk}
    path = "/api/keys/clear-all"
    cleared = [
        envelope(api.post(path, body, content_type="application/json", **headers), 200)["data"]
        for headers in ({}, ZH, JA)
    ]
    assert [c["message"] for c in cleared] == [
        "0 keys cleared", "已清除 0 个密钥", "0 件のキーを削除しました",
    ]  # fmt: skip


def test_not_found_is_translated_with_the_id_and_keeps_its_code(api):
    answers = [envelope(api.get("/api/groups/999999", **headers), 404) for headers in ({}, ZH, JA)]
    assert {a["code"] for a in answers} == {"NOT_FOUND"}
    assert [a["message"] for a in answers] == [
        "group 999999 not found", "分组 999999 不存在", "グループ 999999 が見つかりません",
    ]  # fmt: skip


def test_an_unknown_api_path_names_the_path_in_the_callers_language(api):
    answer = envelope(api.get("/api/nowhere", **JA), 404)
    assert answer == {
        "code": "NOT_FOUND",
        "message": "/api/nowhere に API エンドポイントはありません",
    }


def test_a_refused_setting_is_explained_in_chinese(api):
    response = api.put("/api/settings", {"max_retries": -1}, content_type="application/json", **ZH)
    assert envelope(response, 400) == {
        "code": "VALIDATION_FAILED",
        "message": "max_retries: 必须至少为 0，实际为 -1",
    }
    english = api.put("/api/settings", {"max_retries": -1}, content_type="application/json")
    assert envelope(english, 400)["message"] == "max_retries: must be at least 0, got -1"


def test_settings_come_with_translated_categories_names_and_descriptions(api):
    categories = envelope(api.get("/api/settings", **ZH), 200)["data"]
    assert [c["category_name"] for c in categories] == [
        "基础参数",
        "请求设置",
        "密钥配置",
        "密钥限额",
    ]
    retries = next(s for s in categories[2]["settings"] if s["key"] == "max_retries")
    assert (retries["name"], retries["category"]) == ("最大重试次数", "密钥配置")
    assert retries["description"] == "错误返回给客户端之前的额外尝试次数，每次换用另一个密钥。"
    options = envelope(api.get("/api/groups/config-options", **JA), 200)["data"]
    assert next(o for o in options if o["key"] == "max_retries")["name"] == "最大リトライ回数"
    assert next(o for o in options if o["key"] == "key_wait_seconds")["name"] == (
        "キーの待機時間（秒）"
    )


def test_a_missing_admin_key_is_refused_in_the_callers_language(client):
    answer = envelope(client.get("/api/groups", **ZH), 401)
    assert answer == {
        "code": "UNAUTHORIZED",
        "message": "认证失败：请以 Bearer 令牌或 X-Api-Key 请求头发送 AUTH_KEY。",
    }
    answer = envelope(client.get("/api/groups", **JA), 401)
    assert answer["message"] == (
        "認証に失敗しました：AUTH_KEY を Bearer トークンまたは X-Api-Key ヘッダーで送信してください。"
    )


def test_an_unknown_language_falls_back_to_english(api):
    answer = envelope(api.get("/api/groups/999999", HTTP_ACCEPT_LANGUAGE="fr-FR,fr;q=0.9"), 404)
    assert answer == {"code": "NOT_FOUND", "message": "group 999999 not found"}
    refused = envelope(Client().get("/api/groups", HTTP_ACCEPT_LANGUAGE="fr"), 401)
    assert refused["message"] == (
        "Authentication failed: send AUTH_KEY as a Bearer token or X-Api-Key header."
    )
