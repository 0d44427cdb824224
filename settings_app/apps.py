from __future__ import annotations

from django.apps import AppConfig


class SettingsAppConfig(AppConfig):
    name = "settings_app"
    verbose_name = "Settings"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_migrate, post_save

        from settings_app.changes import settings_changed
        from settings_app.models import SystemSetting, seed_first_boot_settings

        post_migrate.connect(seed_first_boot_settings, sender=self)
        # A system setting can change the effective settings of every group.
        post_save.connect(settings_changed, sender=SystemSetting, dispatch_uid="settings-saved")
        post_delete.connect(settings_changed, sender=SystemSetting, dispatch_uid="settings-deleted")
