"""`/api/settings`: the system settings by category, and their partial update (§5.4).

Values are checked against the registry before anything is stored, and stored all
together or not at all; each changed row is saved through the ORM so that the config
version moves and every process picks the new values up.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from django.http import HttpRequest
from ninja import Body, Router, Schema

from gptload.lib.api import ApiError, Envelope, ok
from settings_app import registry
from settings_app.registry import Setting, SettingError
from settings_app.values import categories, store

log = logging.getLogger("gptload.api")
router = Router(tags=["settings"])


class SettingOut(Schema):
    key: str
    name: str
    value: bool | int | str
    type: Literal["int", "bool", "string"]
    default_value: bool | int | str
    description: str
    category: str
    min_value: int | None = None
    required: bool


class CategoryOut(Schema):
    category_name: str
    settings: list[SettingOut]


@router.get("", response=Envelope[list[CategoryOut]])
def list_settings(request: HttpRequest) -> dict[str, Any]:
    """Every system setting with its value in force, default, type and bounds, by
    category. `proxy_keys` is shown in full: the admin manages it here."""
    return ok(categories())


def typed(setting: Setting, raw: Any) -> Any:
    """`raw` as JSON gave it, checked for the setting's type, then parsed by the registry.

    Stricter than the registry (which also reads stored text): `"5"` is not a number and
    `1` is not a boolean here, as in GPT-Load.
    """
    if setting.kind is int and (
        isinstance(raw, bool)
        or not isinstance(raw, int | float)
        or (isinstance(raw, float) and not raw.is_integer())
    ):
        raise SettingError(f"{setting.key}: {registry.expected_int(raw)}")
    if setting.kind is bool and not isinstance(raw, bool):
        raise SettingError(f"{setting.key}: {registry.expected_bool(raw)}")
    if setting.kind is str and not isinstance(raw, str):
        raise SettingError(f"{setting.key}: {registry.expected_text(raw)}")
    return setting.parse(raw)


def validated(changes: dict[str, Any]) -> dict[str, str]:
    """Each changed setting's stored text; raises `ApiError` naming every bad entry."""
    problems, texts = [], {}
    for key, raw in changes.items():
        setting = registry.REGISTRY.get(key)
        if setting is None:
            problems.append(registry.unknown_setting(key))
            continue
        try:
            texts[key] = setting.serialize(typed(setting, raw))
        except SettingError as exc:
            problems.append(str(exc))
    if problems:
        raise ApiError(400, "VALIDATION_FAILED", "; ".join(problems))
    return texts


@router.put("", response=Envelope[list[CategoryOut]])
def update_settings(request: HttpRequest, changes: Body[dict[str, Any]]) -> dict[str, Any]:
    """Changes some settings: a JSON object `{key: value}` of the ones to change. Every
    value is checked (type, minimum, required, format) before any is stored, and they are
    stored together or not at all. Answers with every setting, as `GET` does."""
    store(validated(changes))
    return ok(categories())
