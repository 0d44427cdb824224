"""The keys' periodic jobs (Celery beat runs them; tests and commands call them directly).

- `validate_due_groups`: every few minutes, each enabled standard group whose
  `key_validation_interval_minutes` has passed since its last validation gets a
  validation job for its invalid keys (queued for a worker, visible in
  `/api/tasks/status`; a group busy with another job waits for the next round).
- `expire_cooling` (from `keys.states`): rate-limited keys whose time is up are stored as
  active again.
- `recount_keys`: daily, every group's keys are counted afresh into `KeyTally`, whose
  every write is counted anyway (a safety net against edits made behind gptload's back).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.utils import timezone

from keys import jobs
from keys.models import APIKey, Group, GroupType, JobKind, KeyStatus, KeyTally
from keys.states import expire_cooling
from settings_app.models import SystemSetting

__all__ = ["expire_cooling", "recount_keys", "validate_due_groups"]

log = logging.getLogger("gptload.jobs")


def validate_due_groups(now: datetime | None = None) -> list[str]:
    """Queues a validation of invalid keys for every group that is due; returns their names."""
    now = now or timezone.now()
    queued = []
    for group in Group.objects.filter(group_type=GroupType.STANDARD, enabled=True):
        interval = SystemSetting.objects.effective(group.config)["key_validation_interval_minutes"]
        if group.last_validated_at and group.last_validated_at > now - timedelta(minutes=interval):
            continue
        if not APIKey.objects.filter(group=group, status=KeyStatus.INVALID).exists():
            Group.objects.filter(pk=group.pk).update(last_validated_at=now)
            continue
        try:
            jobs.start(group, JobKind.VALIDATE, params={"statuses": [KeyStatus.INVALID]})
        except jobs.JobInProgress:
            log.info("group %s is busy with another key job; validating it next round", group)
            continue
        except Exception as exc:  # one group's trouble must not stop the others
            log.warning("could not queue the validation of group %s: %s", group, exc)
            continue
        queued.append(group.name)
    return queued


def recount_keys() -> int:
    """Counts every group's keys afresh into the tally; returns how many groups."""
    group_ids = list(Group.objects.values_list("pk", flat=True))
    KeyTally.objects.recount(group_ids)
    return len(group_ids)
