"""`manage.py validate_keys GROUP [--status STATUS]`: check keys against the upstream."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from keys import jobs
from keys.management import cli
from keys.models import JobKind

CHOICES = ("all", *jobs.VALIDATABLE)


class Command(BaseCommand):
    help = (
        "Check a group's keys against its upstream and store the outcome (valid keys "
        "become active, rejected ones invalid). Runs here; no Celery worker is needed. "
        "Disabled keys are never checked."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("group", help="the group's name")
        parser.add_argument(
            "--status", choices=CHOICES, default="all",
            help="which keys to check (default: all but disabled ones)",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        group = cli.find_group(options["group"])
        status = options["status"]
        statuses = list(jobs.VALIDATABLE) if status == "all" else [status]
        with cli.ProgressBar(self.stderr, f"checking {group.name}") as bar:
            result = cli.run_job(group, JobKind.VALIDATE, params={"statuses": statuses}, bar=bar)
        if options["verbosity"]:
            self.stdout.write(
                f"Checked {cli.count(result['total_keys'], 'key')} of {group.name}: "
                f"{result['valid_keys']:,} valid, {result['invalid_keys']:,} invalid."
            )
