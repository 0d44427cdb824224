"""`manage.py import_keys GROUP [FILE|-]`: add upstream keys to a group."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from keys.management import cli
from keys.models import JobKind


class Command(BaseCommand):
    help = (
        "Add upstream keys to a group from FILE, or from stdin with '-' (one per line, or "
        "separated by spaces, commas or semicolons, or a JSON array of strings). Keys the "
        "group already holds are skipped. Runs here, as a job the API and admin can see."
    )
    requires_system_checks: list[str] = []
    stealth_options = ("stdin",)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("group", help="the group's name")
        parser.add_argument(
            "file", nargs="?", default="-", help="key file, or - for stdin (default)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        group = cli.find_group(options["group"])
        keys = cli.parse(cli.read_text(options["file"], options.get("stdin")))
        with cli.ProgressBar(self.stderr, f"importing into {group.name}") as bar:
            result = cli.run_job(group, JobKind.IMPORT, keys=keys, bar=bar)
        if options["verbosity"]:
            self.stdout.write(
                f"Added {cli.count(result['added_count'], 'key')} to {group.name}; "
                f"{result['ignored_count']:,} ignored (already in the group or repeated). "
                f"The group now holds {cli.count(result['total_in_group'], 'key')}."
            )
