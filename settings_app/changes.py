"""Configuration changes: recorded once, in force here at once, elsewhere within a second.

Every app reports its changes through `config_changed()`, from its own model signals
and its bulk writers (which send none). Within a transaction the changes are gathered
and written after commit as one new version: the `ConfigVersion` row moves and one
`ConfigChange` row per change says what moved (everything, the system settings, or one
group and its keys). Then:

- `config_committed` is sent in this process, still before the code that made the
  change returns, so the proxy here installs it at once (read-your-writes: a script
  that creates a group and calls it on its next line works);
- with Redis, the new version is published on `CONFIG_CHANNEL`, so every other process
  catches up in milliseconds; without it they see the row move within a second.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.dispatch import Signal
from django.utils import timezone

from settings_app.models import ChangeScope, ConfigChange, ConfigVersion

log = logging.getLogger("gptload")
CONFIG_CHANNEL = settings.REDIS_CHANNEL_PREFIX + "config"
KEEP_VERSIONS = 5000  # change rows kept; a process further behind rebuilds everything
# Sent after a change is stored (`versions`: the new version), in the process that made it.
config_committed = Signal()

Change = tuple[str, int | None]  # (scope, group id)
_pending = threading.local()


def config_changed(scope: str = ChangeScope.ALL, group_id: int | None = None) -> None:
    """Notes a configuration change; it is stored (and announced) when the transaction
    commits, or at once outside one. Changes within one transaction make one version."""
    changes: set[Change] | None = getattr(_pending, "changes", None)
    if changes is None:
        changes = _pending.changes = set()
    changes.add((str(scope), group_id))
    # One callback per change: the first to run stores them all, the others find nothing.
    # (A transaction rolled back drops its callbacks; its changes then go with the next
    # commit: one rebuild too many, never one too few.)
    transaction.on_commit(_commit)


def group_changed(group_id: int) -> None:
    config_changed(ChangeScope.GROUP, group_id)


def _commit() -> None:
    changes: set[Change] = getattr(_pending, "changes", None) or set()
    _pending.changes = None
    if changes:
        record(changes)


def record(changes: Iterable[Change]) -> int:
    """Stores `changes` as the next version, announces it, and returns the version."""
    with transaction.atomic():
        # The UPDATE locks the row until commit, so versions commit in order: a reader
        # that sees version N sees every change row up to N.
        moved = ConfigVersion.objects.filter(pk=1).update(
            version=F("version") + 1, updated_at=timezone.now()
        )
        if not moved:
            ConfigVersion.objects.get_or_create(pk=1, defaults={"version": 1})
        version = ConfigVersion.current()
        rows = [ConfigChange(version=version, scope=s, group_id=g) for s, g in changes]
        ConfigChange.objects.bulk_create(rows)
        if version % 100 == 0:
            ConfigChange.objects.filter(version__lte=version - KEEP_VERSIONS).delete()
    config_committed.send(sender=ConfigVersion, version=version)
    publish(version)
    return version


def publish(version: int) -> None:
    """Tells every process through Redis that the configuration moved (cluster mode)."""
    if not settings.REDIS_DSN:
        return
    from django_redis import get_redis_connection

    try:
        get_redis_connection("default").publish(CONFIG_CHANNEL, str(version))
    except Exception as exc:  # the version row still carries the change within a second
        log.warning("could not publish a configuration change to Redis: %s", exc)


def changes_since(version: int) -> tuple[int, set[Change] | None]:
    """The current version, and what changed after `version` (None: too far behind to
    know, rebuild everything)."""
    current = ConfigVersion.current()
    if current <= version:
        return current, set()
    rows = list(
        ConfigChange.objects.filter(version__gt=version, version__lte=current).values_list(
            "version", "scope", "group_id"
        )
    )
    if len({v for v, _, _ in rows}) != current - version:
        return current, None
    return current, {(scope, group_id) for _, scope, group_id in rows}


def settings_changed(**kwargs: object) -> None:
    """`post_save` / `post_delete` of a system setting: every group's settings may move."""
    config_changed(ChangeScope.SETTINGS)
