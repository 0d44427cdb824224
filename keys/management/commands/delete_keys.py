"""`manage.py delete_keys GROUP [FILE|-] | --status STATUS`: remove keys from a group."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys import services
from keys.management import cli
from keys.models import JobKind


class Command(BaseCommand):
    help = (
        "Delete from a group the keys listed in FILE (or stdin with '-'), or every key in a "
        "status with --status (e.g. --status invalid; --status all empties the group)."
    )
    requires_system_checks: list[str] = []
    stealth_options = ("stdin",)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("group", help="the group's name")
        parser.add_argument("file", nargs="?", help="key file, or - for stdin")
        parser.add_argument(
            "--status", choices=services.EXPORT_STATUSES,
            help="delete every key in this status instead of a list",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        if options["status"] and options["file"]:
            raise CommandError("give either a FILE of keys or --status, not both")
        self.verbosity = options["verbosity"]
        group = cli.find_group(options["group"])
        if options["status"]:
            with cli.ProgressBar(self.stderr, f"deleting from {group.name}") as bar:
                deleted = services.clear_keys(group, options["status"], progress=bar)
            self._report(
                f"Deleted {cli.count(deleted, 'key')} ({options['status']}) from {group.name}."
            )
            return
        keys = cli.parse(cli.read_text(options["file"] or "-", options.get("stdin")))
        with cli.ProgressBar(self.stderr, f"deleting from {group.name}") as bar:
            result = cli.run_job(group, JobKind.DELETE, keys=keys, bar=bar)
        self._report(
            f"Deleted {cli.count(result['deleted_count'], 'key')} from {group.name}; "
            f"{result['ignored_count']:,} ignored (not in the group or repeated). "
            f"The group now holds {cli.count(result['total_in_group'], 'key')}."
        )

    def _report(self, line: str) -> None:
        if self.verbosity:
            self.stdout.write(line)
