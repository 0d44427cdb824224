"""The console's settings page: every system setting on one page, grouped as GPT-Load
groups them, each with its description, default, bounds and value in force, edited in
place and checked by the registry (in force on every node at once, like any change)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.utils.translation import gettext_lazy as _
from unfold.admin import ModelAdmin
from unfold.widgets import BASE_INPUT_CLASSES

from gptload.lib.secrets import mask
from settings_app import registry
from settings_app.models import SystemSetting
from settings_app.registry import SettingError
from settings_app.values import categories, store, stored_values

SECRET_SETTINGS = frozenset({"proxy_keys"})


@admin.register(SystemSetting)
class SystemSettingAdmin(ModelAdmin):
    """One page for all settings, not a list of rows: a row exists only for a value that
    differs from its default, and operators think in settings, not rows."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        can_change = self.has_change_permission(request)
        errors: dict[str, str] = {}
        posted: dict[str, str] = {}
        if request.method == "POST":
            if not can_change:
                raise PermissionDenied
            posted = {s.key: form_value(request, s) for s in registry.SETTINGS}
            texts, errors = checked(posted)
            if not errors:
                store(changed_only(texts))
                self.message_user(request, _("Settings saved; in force on every node now."))
                return HttpResponseRedirect(request.path)
            self.message_user(
                request, _("Nothing was saved: fix the values marked below."), messages.ERROR
            )
        context = {
            **self.admin_site.each_context(request), "title": _("Settings"), "opts": self.model._meta,
            "categories": page_rows(posted, errors), "can_change": can_change,
            "input_classes": " ".join(BASE_INPUT_CLASSES),
        }  # fmt: skip
        return TemplateResponse(request, "admin/settings_app/settings.html", context)

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict[str, Any] | None = None) -> HttpResponse:  # fmt: skip
        return HttpResponseRedirect("../../")  # every setting is edited on the one page


def form_value(request: HttpRequest, setting: registry.Setting) -> str:
    if setting.kind is bool:
        return "true" if request.POST.get(setting.key) else "false"
    value = str(request.POST.get(setting.key, "")).strip()
    if not value and setting.key in SECRET_SETTINGS:  # shown masked: empty keeps them
        return setting.serialize(registry.effective(None, stored_values())[setting.key])
    return value


def checked(posted: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Each setting's stored text, and the reason for each value that is refused."""
    texts, errors = {}, {}
    for key, raw in posted.items():
        setting = registry.REGISTRY[key]
        try:
            texts[key] = setting.serialize(setting.parse(raw))
        except SettingError as exc:
            errors[key] = str(exc).removeprefix(f"{key}: ")
    return texts, errors


def changed_only(texts: dict[str, str]) -> dict[str, str]:
    current = registry.effective(None, stored_values())
    return {k: v for k, v in texts.items() if registry.REGISTRY[k].serialize(current[k]) != v}


def page_rows(posted: dict[str, str], errors: dict[str, str]) -> list[dict[str, Any]]:
    """The settings by category, each with what the page shows about it."""
    rows = []
    for category in categories():
        items = []
        for item in category["settings"]:
            setting = registry.REGISTRY[item["key"]]
            value = posted.get(setting.key, setting.serialize(item["value"]))
            bounds = []
            if setting.minimum is not None:
                bounds.append(f"≥ {setting.minimum}")
            if setting.kind is int and setting.maximum < registry.MAXIMUM:
                bounds.append(f"≤ {setting.maximum}")
            default = setting.serialize(item["default_value"])
            secret = setting.key in SECRET_SETTINGS
            items.append({
                **item, "value": "" if secret else value, "secret": secret,
                "placeholder": masked_list(value) if secret else "",
                "error": errors.get(setting.key, ""), "bounds": " ".join(bounds),
                "default_shown": masked_list(default) if secret else default,
                "kind": item["type"], "overridden_by": registry.overridden_by(setting.key),
                "changed": value != default,
            })  # fmt: skip
        rows.append({"name": category["category_name"], "settings": items})
    return rows


def masked_list(text: str) -> str:
    return ", ".join(mask(part) for part in text.split(",") if part)
