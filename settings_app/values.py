"""The system settings as operators see and change them (the API and the console alike)."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.utils.translation import gettext as _

from settings_app import registry
from settings_app.models import SystemSetting
from settings_app.registry import SettingError

log = logging.getLogger("gptload")
TYPE_NAMES: dict[type, str] = {int: "int", bool: "bool", str: "string"}


def stored_values() -> dict[str, Any]:
    """The stored system values, typed; a row that no longer parses is shown as its default."""
    values: dict[str, Any] = {}
    for key, raw in SystemSetting.objects.values_list("setting_key", "setting_value"):
        if key not in registry.REGISTRY:
            continue
        try:
            values[key] = registry.REGISTRY[key].parse(raw)
        except SettingError as exc:
            log.warning("stored setting is unusable, showing its default: %s", exc)
    return values


def categories() -> list[dict[str, Any]]:
    """Every setting by category, its name, description and category in the active language."""
    values = registry.effective(None, stored_values())
    grouped: dict[str, list[dict[str, Any]]] = {}
    for setting in registry.SETTINGS:
        category = _(setting.category)
        grouped.setdefault(category, []).append({
            "key": setting.key, "name": _(setting.name), "value": values[setting.key],
            "type": TYPE_NAMES[setting.kind], "default_value": setting.default_value(),
            "description": _(setting.description), "category": category,
            "min_value": setting.minimum, "required": setting.required,
        })  # fmt: skip
    return [{"category_name": name, "settings": items} for name, items in grouped.items()]


@transaction.atomic
def store(texts: dict[str, str]) -> None:
    rows = SystemSetting.objects.select_for_update().filter(setting_key__in=list(texts))
    existing = {row.setting_key: row for row in rows}
    for key, text in texts.items():
        row = existing.get(key) or SystemSetting(
            setting_key=key, description=registry.REGISTRY[key].description
        )
        if row.pk is None or row.setting_value != text:
            row.setting_value = text
            row.save()
