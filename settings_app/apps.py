from __future__ import annotations

from django.apps import AppConfig


class SettingsAppConfig(AppConfig):
    name = "settings_app"
    verbose_name = "Settings"

    def ready(self) -> None:
        from django.apps import apps
        from django.db.models.signals import post_delete, post_migrate, post_save

        from settings_app.models import bump_config_version, seed_first_boot_settings

        post_migrate.connect(seed_first_boot_settings, sender=self)
        # Every configuration change moves the version that proxy processes poll. Bulk
        # writers (imports, the key-state writer) call ConfigVersion.bump() themselves
        # when a reload is wanted.
        for label in (
            "keys.Group",
            "keys.GroupSubGroup",
            "keys.APIKey",
            "settings_app.SystemSetting",
        ):
            model = apps.get_model(label)
            post_save.connect(bump_config_version, sender=model, dispatch_uid=f"bump-save-{label}")
            post_delete.connect(
                bump_config_version, sender=model, dispatch_uid=f"bump-delete-{label}"
            )
