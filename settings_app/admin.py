from __future__ import annotations

from typing import Any

from django.contrib import admin
from unfold.admin import ModelAdmin

from gptload.lib.adminsecrets import SecretFieldsForm
from gptload.lib.secrets import mask
from settings_app import registry
from settings_app.models import SystemSetting
from settings_app.registry import SettingError

SECRET_SETTINGS = frozenset({"proxy_keys"})


class SystemSettingForm(SecretFieldsForm):
    class Meta:
        model = SystemSetting
        fields = ["setting_key", "setting_value", "description"]

    def active_secret_fields(self) -> tuple[str, ...]:
        key = self.instance.setting_key or self.data.get("setting_key", "")
        return ("setting_value",) if key in SECRET_SETTINGS else ()


@admin.register(SystemSetting)
class SystemSettingAdmin(ModelAdmin):
    form = SystemSettingForm
    list_display = ["setting_key", "value", "default", "overridden_by", "description", "updated_at"]
    search_fields = ["setting_key", "description"]
    readonly_fields = ["created_at", "updated_at"]

    @admin.display(description="Value")
    def value(self, obj: SystemSetting) -> str:
        if obj.setting_key in SECRET_SETTINGS:
            return ", ".join(mask(v) for v in obj.setting_value.split(","))
        return obj.setting_value

    @admin.display(description="Default")
    def default(self, obj: SystemSetting) -> Any:
        if obj.setting_key in SECRET_SETTINGS:
            return "(from AUTH_KEY)"
        try:
            definition = obj.definition
        except SettingError:
            return "(unknown setting: ignored)"
        return definition.serialize(definition.default_value())

    @admin.display(description="Overridden by groups")
    def overridden_by(self, obj: SystemSetting) -> str:
        return ", ".join(registry.overridden_by(obj.setting_key)) or "-"
