from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import models

from settings_app import registry


class SystemSettingQuerySet(models.QuerySet["SystemSetting"]):
    def typed_values(self) -> dict[str, Any]:
        """The stored system values, typed through the registry (unknown keys ignored)."""
        stored = dict(self.values_list("setting_key", "setting_value"))
        return registry.parse_system_values(stored)

    def effective(self, group_config: dict[str, Any] | None = None) -> dict[str, Any]:
        return registry.effective(group_config, self.typed_values())


class SystemSetting(models.Model):
    """A system setting whose value differs from the registry default (GPT-Load's table)."""

    setting_key = models.CharField(max_length=255, unique=True)
    setting_value = models.TextField()
    description = models.CharField(max_length=512, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = SystemSettingQuerySet.as_manager()

    class Meta:
        ordering = ["setting_key"]
        verbose_name = "system setting"

    def __str__(self) -> str:
        return self.setting_key

    @property
    def definition(self) -> registry.Setting:
        return registry.get(self.setting_key)

    def clean(self) -> None:
        try:
            definition = registry.get(self.setting_key)
            self.setting_value = definition.serialize(definition.parse(self.setting_value))
        except registry.SettingError as exc:
            raise ValidationError({"setting_value": str(exc)}) from None
        if not self.description:
            self.description = definition.description


def seed_first_boot_settings(**kwargs: Any) -> None:
    """The global proxy key made at first boot: a random one of its own.

    GPT-Load pins it to the AUTH_KEY instead, which makes every client that holds a
    proxy key an administrator; we never do (README, "Changed on purpose"). The key is
    shown on the console's settings page and by `manage.py auth_key --proxy`.
    """
    definition = registry.get("proxy_keys")
    SystemSetting.objects.using(kwargs.get("using", "default")).get_or_create(
        setting_key=definition.key,
        defaults={"setting_value": registry.new_proxy_key(),
                  "description": definition.description},
    )  # fmt: skip


class ConfigVersion(models.Model):
    """One row whose number moves on every configuration change (groups, keys, settings).

    Each proxy process knows the version its snapshot was built at; when the row moves
    (a pub/sub message says so, or its once-a-second check sees it) it reads the
    `ConfigChange` rows above its version and rebuilds only what they name. Written by
    `settings_app.changes` alone.
    """

    version = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "configuration version"

    def __str__(self) -> str:
        return f"version {self.version}"

    @classmethod
    def current(cls) -> int:
        return cls.objects.filter(pk=1).values_list("version", flat=True).first() or 0


class ChangeScope(models.TextChoices):
    ALL = "all", "Everything"
    SETTINGS = "settings", "System settings"
    GROUP = "group", "One group and its keys"
    ACCESS = "access", "Access keys"


class ConfigChange(models.Model):
    """What one version changed, so that proxies rebuild just that (kept for a while)."""

    version = models.PositiveBigIntegerField(db_index=True)
    scope = models.CharField(max_length=16, choices=ChangeScope.choices)
    group_id = models.PositiveBigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "configuration change"

    def __str__(self) -> str:
        return f"v{self.version}: {self.scope} {self.group_id or ''}".strip()
