"""`manage.py export_keys GROUP [--status STATUS] [-o FILE]`: a group's keys, one per line."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys import services
from keys.management import cli
from keys.models import APIKey


class Command(BaseCommand):
    help = (
        "Write a group's keys in plaintext, one per line, to stdout or to FILE (created "
        "readable by its owner only)."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("group", help="the group's name")
        parser.add_argument(
            "--status", choices=services.EXPORT_STATUSES, default="all",
            help="only keys in this status (default: all)",
        )  # fmt: skip
        parser.add_argument("-o", "--output", metavar="FILE", help="write to FILE, not stdout")

    def handle(self, *args: Any, **options: Any) -> None:
        group = cli.find_group(options["group"])
        status, path = options["status"], options["output"]
        if path is None:
            exported, lost = self._write(group.pk, status, self._to_stdout, None)
        else:
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            except OSError as exc:
                raise CommandError(f"{path}: {exc.strerror or exc}") from None
            total = APIKey.objects.filter(group=group, **services.status_filter(status)).count()
            with (
                open(descriptor, "w", encoding="utf-8") as out,
                cli.ProgressBar(self.stderr, f"exporting {group.name}") as bar,
            ):
                exported, lost = self._write(group.pk, status, out.write, lambda n: bar(n, total))
            if options["verbosity"]:
                self.stderr.write(f"Exported {cli.count(exported, 'key')} of {group.name} to {path}.",
                                  style_func=lambda text: text)  # fmt: skip
        if lost:
            self.stderr.write(
                f"{cli.count(lost, 'key')} could not be decrypted with the configured ENCRYPTION_KEY "
                "and were left out."
            )

    def _write(
        self,
        group_id: int,
        status: str,
        write: Callable[[str], object],
        progress: Callable[[int], None] | None,
    ) -> tuple[int, int]:
        exported = lost = 0
        for batch in services.export_keys(group_id, status):
            write(batch.text)
            exported += batch.count
            lost += batch.undecryptable
            if progress is not None:
                progress(exported + lost)
        return exported, lost

    def _to_stdout(self, text: str) -> None:
        self.stdout.write(text, ending="")
