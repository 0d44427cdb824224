"""The default schedules of the periodic jobs, editable afterwards in the admin
(Periodic tasks). Re-running leaves an operator's edits alone."""

from __future__ import annotations

from typing import Any

from django.db import migrations

SCHEDULES = [
    # name, task, every, period
    ("Validate invalid keys (groups that are due)", "keys.tasks.validate_due_groups", 5, "minutes"),
    ("Return cooled-down keys to active", "keys.tasks.expire_cooling", 1, "minutes"),
    ("Prune request logs past retention", "logs.tasks.prune_logs", 1, "hours"),
]


def create_schedules(apps: Any, schema_editor: Any) -> None:
    interval_model = apps.get_model("django_celery_beat", "IntervalSchedule")
    task_model = apps.get_model("django_celery_beat", "PeriodicTask")
    for name, task, every, period in SCHEDULES:
        interval, _ = interval_model.objects.get_or_create(every=every, period=period)
        task_model.objects.get_or_create(name=name, defaults={"task": task, "interval": interval})


def remove_schedules(apps: Any, schema_editor: Any) -> None:
    task_model = apps.get_model("django_celery_beat", "PeriodicTask")
    task_model.objects.filter(name__in=[name for name, *_ in SCHEDULES]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("keys", "0002_keyjob"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create_schedules, remove_schedules)]
