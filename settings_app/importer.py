"""System settings read from a GPT-Load 1.x database (`manage.py import_gptload`).

GPT-Load writes every one of its 18 settings to `system_settings` at its first boot,
changed or not, so a stored value says little by itself: a value still at GPT-Load's
default is left out, and ours applies (that is how `failover_status_codes` and the
other defaults we changed on purpose reach an operator who never touched them). A value
the operator changed is imported. The global proxy keys are merged with ours, so that
GPT-Load's clients keep working and ours too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from settings_app import registry
from settings_app.models import SystemSetting

# GPT-Load 1.4.9's defaults (`internal/types/types.go`); `app_url` is seeded as
# http://localhost:<PORT> and `proxy_keys` with its AUTH_KEY.
GPTLOAD_DEFAULTS: dict[str, str] = {
    "request_log_retention_days": "7",
    "request_log_write_interval_minutes": "1",
    "enable_request_body_logging": "false",
    "request_timeout": "600",
    "connect_timeout": "15",
    "idle_conn_timeout": "120",
    "response_header_timeout": "600",
    "max_idle_conns": "100",
    "max_idle_conns_per_host": "50",
    "proxy_url": "",
    "max_retries": "3",
    "blacklist_threshold": "3",
    "failover_status_codes": "400-403,405-999",
    "key_validation_interval_minutes": "60",
    "key_validation_concurrency": "10",
    "key_validation_timeout_seconds": "20",
}
SEEDED_HOSTS = ("localhost", "127.0.0.1")


@dataclass
class SettingsOutcome:
    imported: list[str] = field(default_factory=list)  # names only: values may be secrets
    unchanged: list[str] = field(default_factory=list)
    at_default: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "name (reason)"
    unknown: list[str] = field(default_factory=list)


def import_settings(stored: Mapping[str, str], *, dry_run: bool) -> SettingsOutcome:
    """Stores GPT-Load's changed settings (`setting_key` → `setting_value`) as ours; with
    `dry_run`, only sorts them. Call inside the phase's transaction."""
    outcome = SettingsOutcome()
    for key, raw in sorted(stored.items()):
        if key not in registry.REGISTRY:
            outcome.unknown.append(key)
            continue
        definition = registry.get(key)
        try:
            value = _wanted(definition, raw)
        except registry.SettingError as exc:
            outcome.refused.append(f"{key} ({exc})")
            continue
        if value is None:
            outcome.at_default.append(key)
        elif value == _current(definition):
            outcome.unchanged.append(key)
        else:
            outcome.imported.append(key)
            if not dry_run:
                SystemSetting.objects.update_or_create(
                    setting_key=key,
                    defaults={"setting_value": definition.serialize(value),
                              "description": definition.description},
                )  # fmt: skip
    return outcome


def _wanted(definition: registry.Setting, raw: str) -> Any:
    """The typed value to store for GPT-Load's `raw`, or None when it is GPT-Load's
    default (ours applies). Raises `SettingError` for a value our rules refuse."""
    key = definition.key
    if key == "proxy_keys":
        merged = ",".join(filter(None, (_current(definition), raw.strip())))
        return definition.parse(merged) if merged else None
    if key == "app_url" and (urlsplit(raw.strip()).hostname or "") in SEEDED_HOSTS:
        return None
    if key in GPTLOAD_DEFAULTS and _same(definition, raw, GPTLOAD_DEFAULTS[key]):
        return None
    return definition.parse(raw)


def _same(definition: registry.Setting, raw: str, default: str) -> bool:
    try:
        return bool(definition.parse(raw) == definition.parse(default))
    except registry.SettingError:
        return False


def _current(definition: registry.Setting) -> Any:
    stored = (
        SystemSetting.objects.filter(setting_key=definition.key)
        .values_list("setting_value", flat=True)
        .first()
    )
    return definition.default_value() if stored is None else definition.parse(stored)
