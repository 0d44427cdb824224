from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class KeysConfig(AppConfig):
    name = "keys"
    verbose_name = "Groups and keys"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from keys.models import APIKey, Group, GroupSubGroup
        from settings_app import registry

        # Every change to a group, a membership or a key reloads that group in every
        # proxy; bulk writers (imports, clears) report theirs in `keys.services`.
        for model, receiver in ((Group, group_saved), (GroupSubGroup, membership_saved),
                                (APIKey, key_saved)):  # fmt: skip
            label = model._meta.label
            post_save.connect(receiver, sender=model, dispatch_uid=f"changed-{label}")
            post_delete.connect(receiver, sender=model, dispatch_uid=f"deleted-{label}")
        registry.register_override_finder(groups_overriding)


def group_saved(instance: Any, **kwargs: Any) -> None:
    from settings_app.changes import group_changed

    group_changed(instance.pk)


def membership_saved(instance: Any, **kwargs: Any) -> None:
    from settings_app.changes import group_changed

    group_changed(instance.group_id)  # the aggregate's routing changed


def key_saved(instance: Any, **kwargs: Any) -> None:
    from settings_app.changes import group_changed

    group_changed(instance.group_id)


def groups_overriding(setting: str) -> list[str]:
    from keys.models import Group

    return list(Group.objects.filter(config__has_key=setting).values_list("name", flat=True))
