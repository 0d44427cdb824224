from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from settings_app import registry

log = logging.getLogger("gptload")
CONFIG_CHANNEL = "gptload:config"


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
    """GPT-Load pins the global proxy keys to AUTH_KEY at first boot; so do we.

    Later changes of AUTH_KEY then change the admin key only, not what clients use.
    """
    definition = registry.get("proxy_keys")
    SystemSetting.objects.using(kwargs.get("using", "default")).get_or_create(
        setting_key=definition.key,
        defaults={
            "setting_value": definition.parse(definition.default_value()),
            "description": definition.description,
        },
    )


class ConfigVersion(models.Model):
    """One row whose number moves on every configuration change (groups, keys, settings).

    Each process polls it (one indexed read a second) and rebuilds its proxy snapshot
    when it moves, so a change made anywhere is in force everywhere without a restart.
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

    @classmethod
    def bump(cls) -> None:
        from django.db.models import F
        from django.utils import timezone

        if not cls.objects.filter(pk=1).update(version=F("version") + 1, updated_at=timezone.now()):
            cls.objects.get_or_create(pk=1, defaults={"version": 1})
        publish_config_change()


def publish_config_change() -> None:
    """Tells every process through Redis that the configuration moved (cluster mode)."""
    if not settings.REDIS_DSN:
        return
    from django_redis import get_redis_connection

    try:
        get_redis_connection("default").publish(CONFIG_CHANNEL, "moved")
    except Exception as exc:  # the version row still carries the change within a second
        log.warning("could not publish a configuration change to Redis: %s", exc)


def bump_config_version(**kwargs: Any) -> None:
    from django.db import transaction

    transaction.on_commit(ConfigVersion.bump, using=kwargs.get("using"))
