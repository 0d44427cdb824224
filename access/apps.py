from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class AccessConfig(AppConfig):
    name = "access"
    verbose_name = "Access keys"

    def ready(self) -> None:
        from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete

        from access.models import AccessKey
        from keys.models import Group

        # Every change to an access key, or to the groups it may call, reloads the access
        # keys in every proxy.
        post_save.connect(access_changed, sender=AccessKey, dispatch_uid="changed-access-key")
        post_delete.connect(access_changed, sender=AccessKey, dispatch_uid="deleted-access-key")
        m2m_changed.connect(
            groups_changed, sender=AccessKey.groups.through, dispatch_uid="access-key-groups"
        )
        pre_delete.connect(group_deleting, sender=Group, dispatch_uid="access-group-deleting")


def access_changed(**kwargs: Any) -> None:
    from settings_app.changes import config_changed
    from settings_app.models import ChangeScope

    config_changed(ChangeScope.ACCESS)


def groups_changed(action: str, **kwargs: Any) -> None:
    if action.startswith("post_"):
        access_changed()


def group_deleting(instance: Any, **kwargs: Any) -> None:
    """A group is about to go: the access keys limited to it lose it from their list.

    A key whose only group this was would be left with none, which means every group, so
    it is disabled instead: deleting a group never widens what a client may call.
    """
    from django.db.models import Count

    from access.models import AccessKey

    scoped = AccessKey.objects.filter(groups=instance.pk)
    if not scoped.exists():
        return
    alone = (
        AccessKey.objects.filter(pk__in=list(scoped.values_list("pk", flat=True)), enabled=True)
        .annotate(scope=Count("groups"))
        .filter(scope=1)
    )
    for key in alone:
        key.enabled = False
        note = f"Disabled when its only group, {instance.name}, was deleted."
        key.notes = f"{key.notes}\n{note}" if key.notes else note
        key.save(update_fields=["enabled", "notes", "updated_at"])
    access_changed()
