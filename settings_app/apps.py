from __future__ import annotations

from django.apps import AppConfig


class SettingsAppConfig(AppConfig):
    name = "settings_app"
    verbose_name = "Settings"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from settings_app.models import seed_first_boot_settings

        post_migrate.connect(seed_first_boot_settings, sender=self)
