"""`GET /api/settings` and `PUT /api/settings`: categories, validation, all-or-nothing."""

from __future__ import annotations

import pytest

from settings_app import registry
from settings_app.models import ConfigVersion, SystemSetting

pytestmark = pytest.mark.django_db
GLOBAL_KEYS = "sk-global-proxy-key-000000000001"


@pytest.fixture
def stored(settings):
    """A few settings already stored, as after an operator's earlier changes."""
    settings.HOST, settings.PORT = "0.0.0.0", 3001
    SystemSetting.objects.update_or_create(
        setting_key="proxy_keys", defaults={"setting_value": GLOBAL_KEYS}
    )
    SystemSetting.objects.create(setting_key="max_retries", setting_value="5")
    SystemSetting.objects.create(setting_key="enable_request_body_logging", setting_value="true")


def stored_values() -> dict[str, str]:
    return dict(SystemSetting.objects.values_list("setting_key", "setting_value"))


def by_key(categories: list[dict]) -> dict[str, dict]:
    return {s["key"]: s for category in categories for s in category["settings"]}


def test_settings_come_by_category_with_their_metadata(admin_api, stored):
    categories = admin_api.data(admin_api.get("/settings"))
    assert [c["category_name"] for c in categories] == [
        "Basic", "Request settings", "Key configuration", "Key limits",
    ]  # fmt: skip
    settings = by_key(categories)
    assert list(settings) == [s.key for s in registry.SETTINGS]
    assert settings["max_retries"] == {
        "key": "max_retries", "name": "Max retries", "value": 5, "type": "int",
        "default_value": 3, "description": registry.get("max_retries").description,
        "category": "Key configuration", "min_value": 0, "required": False,
    }  # fmt: skip
    assert settings["enable_request_body_logging"]["value"] is True
    assert settings["enable_request_body_logging"]["default_value"] is False
    assert settings["enable_request_body_logging"]["type"] == "bool"
    assert settings["request_timeout"] | {"description": ""} == {
        "key": "request_timeout", "name": "Request timeout (s)", "value": 600, "type": "int",
        "default_value": 600, "description": "", "category": "Request settings",
        "min_value": 1, "required": False,
    }  # fmt: skip
    assert settings["proxy_keys"]["value"] == GLOBAL_KEYS  # the admin sees it in full
    assert (settings["proxy_keys"]["type"], settings["proxy_keys"]["required"]) == ("string", True)
    assert settings["app_url"]["value"] == "http://localhost:3001"
    assert settings["proxy_url"]["min_value"] is None


def test_a_stored_value_that_no_longer_parses_shows_the_default(admin_api, stored):
    SystemSetting.objects.filter(setting_key="max_retries").update(setting_value="many")
    assert by_key(admin_api.data(admin_api.get("/settings")))["max_retries"]["value"] == 3


def test_put_stores_the_given_settings_and_answers_with_all(
    admin_api, stored, django_capture_on_commit_callbacks
):
    version = ConfigVersion.current()
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_api.put("/settings", {
            "max_retries": 7, "request_timeout": 30.0, "enable_request_body_logging": False,
            "proxy_keys": " sk-a-0000000000000001 , ,sk-b-0000000000000002,sk-a-0000000000000001",
            "failover_status_codes": "429, 500-599", "app_url": "https://gw.example.com/",
            "proxy_url": "",
        })  # fmt: skip
    settings = by_key(admin_api.data(response))
    assert (settings["max_retries"]["value"], settings["request_timeout"]["value"]) == (7, 30)
    assert settings["enable_request_body_logging"]["value"] is False
    assert stored_values() == {
        "max_retries": "7", "request_timeout": "30", "enable_request_body_logging": "false",
        "proxy_keys": "sk-a-0000000000000001,sk-b-0000000000000002",
        "failover_status_codes": "429,500-599", "app_url": "https://gw.example.com",
        "proxy_url": "",
    }  # fmt: skip
    assert SystemSetting.objects.get(setting_key="request_timeout").description
    assert ConfigVersion.current() > version
    assert SystemSetting.objects.effective()["max_retries"] == 7


def test_an_unchanged_value_is_not_rewritten(admin_api, stored, django_capture_on_commit_callbacks):
    before = SystemSetting.objects.get(setting_key="max_retries").updated_at
    version = ConfigVersion.current()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        admin_api.data(admin_api.put("/settings", {"max_retries": 5}))
    assert SystemSetting.objects.get(setting_key="max_retries").updated_at == before
    assert (callbacks, ConfigVersion.current()) == ([], version)


def test_an_empty_map_changes_nothing(admin_api, stored):
    before = stored_values()
    assert len(admin_api.data(admin_api.put("/settings", {}))) == 4
    assert stored_values() == before


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"max_retry": 4}, "unknown setting 'max_retry'"),
        ({"max_retries": 2.5}, "max_retries: expected a whole number"),
        ({"max_retries": True}, "max_retries: expected a whole number"),
        ({"max_retries": "4"}, "max_retries: expected a whole number"),
        ({"max_retries": None}, "max_retries: expected a whole number"),
        ({"max_retries": -1}, "max_retries: must be at least 0"),
        ({"request_timeout": 0}, "request_timeout: must be at least 1"),
        # Accepted before: timedelta and the schedulers overflowed on them later.
        ({"request_timeout": 10**19}, "request_timeout: must be at most 1000000"),
        ({"key_validation_interval_minutes": 1e308}, "must be at most 1000000"),
        (
            {"request_log_retention_days": 36501},
            "request_log_retention_days: must be at most 36500",
        ),
        ({"enable_request_body_logging": 1}, "enable_request_body_logging: expected true or false"),
        ({"enable_request_body_logging": "true"}, "enable_request_body_logging: expected true"),
        ({"proxy_keys": ""}, "proxy_keys: must not be empty"),
        ({"proxy_keys": " , ,"}, "proxy_keys: must not be empty"),
        ({"proxy_keys": ["sk-1"]}, "proxy_keys: expected text"),
        ({"app_url": ""}, "app_url"),
        ({"app_url": "ftp://files.example"}, "app_url"),
        ({"failover_status_codes": "500-5xx"}, "failover_status_codes"),
        ({"proxy_url": "gopher://proxy.example"}, "proxy_url"),
    ],
)
def test_bad_values_are_refused_with_the_reason(admin_api, stored, changes, words):
    before = stored_values()
    message = admin_api.refused(admin_api.put("/settings", changes), 400, "VALIDATION_FAILED")
    assert words in message
    assert stored_values() == before


def test_one_bad_value_keeps_every_good_one_out(admin_api, stored):
    before = stored_values()
    response = admin_api.put("/settings", {
        "max_retries": 9, "request_timeout": 45, "blacklist_threshold": -3, "nonsense": 1,
    })  # fmt: skip
    message = admin_api.refused(response, 400, "VALIDATION_FAILED")
    assert "blacklist_threshold: must be at least 0" in message
    assert "unknown setting 'nonsense'" in message
    assert stored_values() == before


def test_a_failure_while_storing_rolls_every_change_back(admin_api, stored, monkeypatch):
    before = stored_values()
    real_save = SystemSetting.save
    saved: list[str] = []

    def save_then_fail(self, *args, **kwargs):
        if saved:
            raise RuntimeError("the database went away")
        saved.append(self.setting_key)
        real_save(self, *args, **kwargs)

    monkeypatch.setattr(SystemSetting, "save", save_then_fail)
    response = admin_api.put("/settings", {"max_retries": 1, "request_timeout": 99})
    admin_api.refused(response, 500, "INTERNAL_SERVER_ERROR")
    assert saved == ["max_retries"]
    assert stored_values() == before


@pytest.mark.parametrize(
    ("body", "code"),
    [('{"max_retries": ', "INVALID_JSON"), ("[1, 2]", "VALIDATION_FAILED"), ('"x"', "VALIDATION_FAILED")],
)  # fmt: skip
def test_a_body_that_is_not_an_object_is_refused(admin_api, client, stored, body, code):
    response = client.put("/api/settings", body, content_type="application/json",
                          headers=admin_api.headers)  # fmt: skip
    admin_api.refused(response, 400, code)


def test_settings_need_the_admin_key_and_are_documented(admin_api, client, stored):
    admin_api.refused(client.get("/api/settings"), 401, "UNAUTHORIZED")
    response = client.put("/api/settings", '{"max_retries": 0}', content_type="application/json")
    admin_api.refused(response, 401, "UNAUTHORIZED")
    assert stored_values()["max_retries"] == "5"
    paths = client.get("/api/openapi.json").json()["paths"]
    assert {"get", "put"} <= set(paths["/api/settings"])
    assert paths["/api/settings"]["put"]["description"]
