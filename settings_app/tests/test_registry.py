from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings

from gptload.lib.secrets import weakness
from settings_app import registry
from settings_app.models import SystemSetting, seed_first_boot_settings
from settings_app.registry import SettingError

GPT_LOAD_KEYS = {
    "app_url": False, "proxy_keys": False, "request_log_retention_days": False,
    "request_log_write_interval_minutes": False, "enable_request_body_logging": True,
    "request_timeout": True, "connect_timeout": True, "idle_conn_timeout": True,
    "response_header_timeout": True, "max_idle_conns": True, "max_idle_conns_per_host": True,
    "proxy_url": True, "max_retries": True, "blacklist_threshold": True,
    "failover_status_codes": True, "key_validation_interval_minutes": True,
    "key_validation_concurrency": True, "key_validation_timeout_seconds": True,
}  # fmt: skip


# gptload's own: per-key limits, every one a group may override.
OWN_KEYS = {"key_rpm": True, "key_rpd": True, "key_max_concurrency": True,
            "key_wait_seconds": True}  # fmt: skip


def test_it_has_gpt_loads_18_settings_with_their_group_flags_and_our_key_limits():
    assert {s.key: s.group_overridable for s in registry.SETTINGS} == GPT_LOAD_KEYS | OWN_KEYS


def test_key_limits_default_to_none_and_key_wait_seconds_is_bounded():
    defaults = registry.defaults()
    assert [defaults[k] for k in OWN_KEYS] == [0, 0, 0, 0]
    assert registry.validate_group_config({"key_rpm": "60", "key_wait_seconds": 120}) == {
        "key_rpm": 60, "key_wait_seconds": 120}  # fmt: skip
    for bad in ({"key_wait_seconds": 121}, {"key_rpm": -1}, {"key_max_concurrency": 1.5}):
        with pytest.raises(SettingError):
            registry.validate_group_config(bad)


def test_defaults_match_gpt_load_where_we_do_not_argue_otherwise():
    defaults = registry.defaults()
    assert defaults["request_log_retention_days"] == 7
    assert defaults["request_timeout"] == 600
    assert defaults["max_retries"] == 3
    assert defaults["blacklist_threshold"] == 3
    assert defaults["key_validation_interval_minutes"] == 60
    assert defaults["enable_request_body_logging"] is False
    assert 404 not in registry.parse_status_codes(defaults["failover_status_codes"])
    assert {401, 403, 429, 500, 503} <= registry.parse_status_codes(
        defaults["failover_status_codes"]
    )


@override_settings(HOST="0.0.0.0", PORT=3005, AUTH_KEY="sk-from-env-123456789")
def test_computed_defaults_come_from_the_environment():
    assert registry.get("app_url").default_value() == "http://localhost:3005"
    assert registry.get("proxy_keys").default_value() == ""  # never the AUTH_KEY


@pytest.mark.parametrize(
    ("key", "raw", "value"),
    [
        ("max_retries", 5, 5), ("max_retries", "5", 5), ("max_retries", 5.0, 5), ("max_retries", 0, 0),
        ("enable_request_body_logging", "true", True), ("enable_request_body_logging", False, False),
        ("failover_status_codes", " 429, 500-599 ", "429,500-599"), ("failover_status_codes", "", ""),
        ("proxy_keys", " a, b ,a,, ", "a,b"), ("app_url", "https://gw.example.com/", "https://gw.example.com"),
        ("proxy_url", "socks5://127.0.0.1:1080", "socks5://127.0.0.1:1080"), ("proxy_url", "", ""),
    ],
)  # fmt: skip
def test_values_are_parsed_to_their_types(key, raw, value):
    assert registry.get(key).parse(raw) == value


@pytest.mark.parametrize(
    ("key", "raw", "message"),
    [
        ("max_retries", -1, "max_retries: must be at least 0"),
        ("request_timeout", 0, "request_timeout: must be at least 1"),
        ("max_retries", "three", "expected a whole number"),
        ("max_retries", 2.5, "expected a whole number"),
        ("max_retries", True, "expected a whole number"),
        ("enable_request_body_logging", "maybe", "expected true or false"),
        ("failover_status_codes", "500-abc", "not a status code"),
        ("failover_status_codes", "99", "not a status code"),
        ("failover_status_codes", "599-500", "within 100-999, low to high"),
        ("proxy_keys", " , ", "proxy_keys: must not be empty"),
        ("app_url", "ftp://x", "not an http:// or https:// URL"),
        ("app_url", "http://gw.example.com:99999", "not an http:// or https:// URL"),
        ("proxy_url", "gopher://x", "not an http://, https:// or socks5://"),
        ("proxy_url", 5, "expected text"),
    ],
)
def test_bad_values_are_refused_with_a_reason(key, raw, message):
    with pytest.raises(SettingError, match=message):
        registry.get(key).parse(raw)


def test_unknown_settings_are_refused():
    with pytest.raises(SettingError, match="unknown setting 'nope'"):
        registry.get("nope")


def test_group_config_is_validated():
    assert registry.validate_group_config({"max_retries": "2", "proxy_url": None}) == {
        "max_retries": 2
    }
    with pytest.raises(SettingError, match="unknown config field 'retries'"):
        registry.validate_group_config({"retries": 2})
    with pytest.raises(SettingError, match="'app_url' is a system-wide setting"):
        registry.validate_group_config({"app_url": "http://x"})
    with pytest.raises(SettingError, match="blacklist_threshold: must be at least 0"):
        registry.validate_group_config({"blacklist_threshold": -3})
    with pytest.raises(SettingError, match="must be an object"):
        registry.validate_group_config(["max_retries"])


def test_effective_value_is_group_then_system_then_default():
    system = {"max_retries": 5, "request_timeout": 30}
    values = registry.effective({"max_retries": 1, "app_url": "http://ignored"}, system)
    assert values["max_retries"] == 1  # group override
    assert values["request_timeout"] == 30  # system value
    assert values["connect_timeout"] == 15  # default
    assert values["app_url"] != "http://ignored"  # not group-overridable


@pytest.mark.django_db
def test_effective_values_read_the_database():
    SystemSetting.objects.create(setting_key="max_retries", setting_value="7")
    SystemSetting.objects.create(setting_key="an_old_setting_we_dropped", setting_value="x")
    assert SystemSetting.objects.typed_values()["max_retries"] == 7
    assert SystemSetting.objects.effective()["max_retries"] == 7
    assert SystemSetting.objects.effective({"max_retries": 2})["max_retries"] == 2
    assert "an_old_setting_we_dropped" not in SystemSetting.objects.effective()


@pytest.mark.django_db
def test_the_global_proxy_key_made_at_first_boot_is_random_and_never_the_auth_key(settings):
    stored = SystemSetting.objects.get(setting_key="proxy_keys").setting_value
    assert stored != settings.AUTH_KEY
    assert settings.AUTH_KEY not in stored
    assert stored.startswith("sk-")
    assert len(stored) == 51
    assert weakness(stored) is None
    SystemSetting.objects.filter(setting_key="proxy_keys").delete()
    seed_first_boot_settings()
    assert SystemSetting.objects.get(setting_key="proxy_keys").setting_value != stored


@pytest.mark.django_db
def test_a_stored_setting_is_validated_through_the_registry():
    setting = SystemSetting(setting_key="max_retries", setting_value=" 4 ")
    setting.full_clean()
    assert setting.setting_value == "4"
    assert setting.description  # filled from the registry
    with pytest.raises(ValidationError, match="must be at least 0"):
        SystemSetting(setting_key="max_retries", setting_value="-2").full_clean()
    with pytest.raises(ValidationError, match="unknown setting"):
        SystemSetting(setting_key="bogus", setting_value="1").full_clean()
