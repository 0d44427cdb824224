"""`manage.py import_gptload --from DSN`: move a GPT-Load 1.x installation here in one
command: its groups (config, upstreams, rules, proxy keys), aggregate members, keys,
system settings and, with `--with-logs`, its request logs and hourly statistics.

It lives in the entry package because it drives every app; each app stores its own part
(`keys.importer`, `settings_app.importer`, `logs.importer`) and `gptload.lib.gptload_db`
reads GPT-Load's database. Before the first write every key is read under GPT-Load's
ENCRYPTION_KEY and every group checked against our rules, so a refusal leaves both
databases as they were. Then each phase is one transaction (logs: one per batch), every
row is matched (groups by name, keys by hash within their group, logs by id), and a
second run finds nothing to add.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from gptload.lib import gptload_db as db
from gptload.lib.crypto import Cipher
from keys import importer as keys_importer
from keys.management.cli import ProgressBar, count
from logs import importer as logs_importer
from settings_app import importer as settings_importer
from settings_app.changes import config_changed
from settings_app.models import ChangeScope

# GPT-Load's ENCRYPTION_KEY, for those who would rather not type it on a command line
# (where `ps` shows it). An input of this one-off command, not a setting of gptload's.
ENCRYPTION_KEY_VARIABLE = "GPTLOAD_ENCRYPTION_KEY"
Batches = Iterator[list[db.Row]]


@dataclass
class Summary:
    groups: keys_importer.Tally = field(default_factory=keys_importer.Tally)
    members: keys_importer.Tally = field(default_factory=keys_importer.Tally)
    keys: keys_importer.Tally = field(default_factory=keys_importer.Tally)
    settings: settings_importer.SettingsOutcome = field(
        default_factory=settings_importer.SettingsOutcome
    )
    logs: logs_importer.LogTally | None = None
    hourly: logs_importer.LogTally | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def wrote(self) -> bool:
        moved = (self.groups.created, self.groups.updated, self.members.created,
                 self.members.updated, self.keys.created, len(self.settings.imported))  # fmt: skip
        return any(moved)


class Command(BaseCommand):
    help = (
        "Import a GPT-Load 1.x database (SQLite file, MySQL/MariaDB or PostgreSQL; any "
        "DATABASE_DSN form GPT-Load accepts): groups with their config, upstreams, rules "
        "and proxy keys, aggregate members, keys (decrypted with GPT-Load's ENCRYPTION_KEY, "
        "stored under ours), changed system settings, and with --with-logs its request "
        "logs and hourly statistics. Stop GPT-Load first. Safe to run again: what is here "
        "already is matched and left alone. Nothing is written when a key does not decrypt."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--from", dest="dsn", required=True, metavar="DSN",
                            help="GPT-Load's DATABASE_DSN, e.g. ./data/gpt-load.db or "
                                 "user:pass@tcp(host:3306)/gpt-load")  # fmt: skip
        parser.add_argument("--encryption-key", default=None, metavar="KEY",
                            help=f"GPT-Load's ENCRYPTION_KEY, if it had one (default: "
                                 f"${ENCRYPTION_KEY_VARIABLE}, else none)")  # fmt: skip
        parser.add_argument("--dry-run", action="store_true",
                            help="read everything and report what would change; write nothing")  # fmt: skip
        parser.add_argument("--with-logs", action="store_true",
                            help="also import request logs and hourly statistics")  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        secret = options["encryption_key"]
        if secret is None:
            secret = os.environ.get(ENCRYPTION_KEY_VARIABLE, "")
        try:
            # GPT-Load and gptload read the same TZ variable: under `loc=Local` GPT-Load's
            # MySQL times are in it.
            source = db.Source(options["dsn"], Path.cwd(), settings.TIME_ZONE)
        except db.SourceError as exc:
            raise CommandError(str(exc)) from None
        self.writing = False
        try:
            summary = self.run(source, Cipher(secret), options["dry_run"], options["with_logs"])
        except (db.SourceError, keys_importer.ImportRefused) as exc:
            raise CommandError(f"{exc}. {self.what_was_kept()}") from None
        finally:
            source.close()
        self.report(source, summary, options["dry_run"])

    def run(self, source: db.Source, cipher: Cipher, dry_run: bool, with_logs: bool) -> Summary:
        source.check()
        summary = Summary()
        self.check_keys(source, cipher)
        plan = keys_importer.plan_groups(
            row for batch in source.batches("groups", keys_importer.GROUP_COLUMNS) for row in batch
        )
        summary.warnings += plan.warnings
        groups = plan.by_source_id()
        members = [r for b in source.batches("group_sub_groups", keys_importer.MEMBER_COLUMNS)
                   for r in b]  # fmt: skip
        self.writing = not dry_run
        with _phase(dry_run):
            summary.groups = (
                keys_importer.count_groups(plan) if dry_run else keys_importer.store_groups(plan)
            )
            summary.members = keys_importer.import_members(members, groups, dry_run=dry_run)
        with _phase(dry_run):
            summary.keys = self.import_keys(source, groups, cipher, dry_run)
        with _phase(dry_run):
            stored = {
                db.text_value(r["setting_key"]): db.text_value(r["setting_value"])
                for batch in source.batches(
                    "system_settings", ("id", "setting_key", "setting_value")
                )
                for r in batch
            }
            summary.settings = settings_importer.import_settings(stored, dry_run=dry_run)
        if with_logs:
            group_ids = {s: p.group.pk or 0 for s, p in groups.items()}
            summary.logs = self.import_logs(source, group_ids, cipher, dry_run)
            summary.hourly = self.import_hourly(source, group_ids, dry_run)
        if summary.wrote and not dry_run:
            config_changed(ChangeScope.ALL)  # once, so every running node reloads it all
        return summary

    def what_was_kept(self) -> str:
        if not self.writing:
            return "Nothing was imported."
        return (
            "The phases finished before it were stored (each is one transaction): fix the "
            "cause, stop GPT-Load if it runs, and run the import again to finish it."
        )

    def check_keys(self, source: db.Source, cipher: Cipher) -> None:
        check = keys_importer.KeyCheck()
        for batch in self.walk(source, "api_keys", keys_importer.KEY_COLUMNS, "checking keys"):
            keys_importer.check_keys(batch, cipher, check)
        if check.unreadable:
            raise keys_importer.ImportRefused(unreadable(check, cipher))

    def import_keys(
        self, source: db.Source, groups: dict[int, keys_importer.GroupPlan], cipher: Cipher,
        dry_run: bool,
    ) -> keys_importer.Tally:  # fmt: skip
        tally = keys_importer.Tally()
        for batch in self.walk(source, "api_keys", keys_importer.KEY_COLUMNS, "importing keys"):
            tally += keys_importer.import_keys(batch, groups, cipher, dry_run=dry_run)
        if tally.created and not dry_run:
            keys_importer.keys_changed(groups.values())
        return tally

    def import_logs(
        self, source: db.Source, group_ids: dict[int, int], cipher: Cipher, dry_run: bool
    ) -> logs_importer.LogTally:
        tally = logs_importer.LogTally()
        for batch in self.walk(source, "request_logs", logs_importer.LOG_COLUMNS, "request logs"):
            tally += logs_importer.import_logs(batch, group_ids, cipher, dry_run=dry_run)
        return tally

    def import_hourly(
        self, source: db.Source, group_ids: dict[int, int], dry_run: bool
    ) -> logs_importer.LogTally:
        tally = logs_importer.LogTally()
        columns = logs_importer.HOURLY_COLUMNS
        for batch in self.walk(source, "group_hourly_stats", columns, "hourly statistics"):
            tally += logs_importer.import_hourly(batch, group_ids, dry_run=dry_run)
        return tally

    def walk(self, source: db.Source, table: str, columns: tuple[str, ...], label: str) -> Batches:
        """The table's rows a batch at a time, with a progress bar on a terminal."""
        total = source.count(table)
        done = 0
        with ProgressBar(self.stderr, label) as bar:
            bar(0, total)
            for batch in source.batches(table, columns):
                yield batch
                done += len(batch)
                bar(done, max(total, done))

    def report(self, source: db.Source, summary: Summary, dry_run: bool) -> None:
        write: Callable[[str], None] = self.stdout.write
        would = "would be " if dry_run else ""
        write(f"From {source.description}:")
        for warning in summary.warnings:
            write(self.style.WARNING(f"  warning: {warning}"))
        g, m, k, s = summary.groups, summary.members, summary.keys, summary.settings
        write(f"  groups: {g.created} {would}created, {g.updated} {would}updated, "
              f"{g.unchanged} unchanged")  # fmt: skip
        write(f"  aggregate members: {m.created} {would}added, {m.updated} {would}updated, "
              f"{m.unchanged} unchanged{_gone(m.skipped, 'of deleted groups')}")  # fmt: skip
        write(f"  keys: {count(k.created, 'key')} {would}added, {k.unchanged:,} here already"
              f"{_gone(k.skipped, 'of deleted groups')}")  # fmt: skip
        imported = f" ({', '.join(s.imported)})" if s.imported else ""
        write(f"  settings: {len(s.imported)} {would}imported{imported}, {len(s.unchanged)} "
              f"unchanged, {len(s.at_default)} at GPT-Load's default (ours apply)")  # fmt: skip
        for refused in s.refused:
            write(self.style.WARNING(f"  warning: setting {refused} left out"))
        if summary.logs is not None and summary.hourly is not None:
            lg, h = summary.logs, summary.hourly
            keyless = f", {lg.keyless:,} without their key (not decryptable)" * bool(lg.keyless)
            write(f"  request logs: {lg.added:,} {would}added, {lg.present:,} here already"
                  f"{keyless}")  # fmt: skip
            write(f"  hourly statistics: {h.added:,} {would}added, {h.present:,} here already"
                  f"{_gone(h.skipped, 'of deleted groups')}")  # fmt: skip
        else:
            write("  request logs and hourly statistics: not imported (--with-logs imports them)")
        if dry_run:
            write(self.style.WARNING("Dry run: nothing was written."))
        elif summary.wrote:
            write(self.style.SUCCESS("Done. Running gptload processes have picked it up."))
        else:
            write(self.style.SUCCESS("Done: everything was here already."))


def unreadable(check: keys_importer.KeyCheck, cipher: Cipher) -> str:
    """The one-line refusal for keys that do not read under the given ENCRYPTION_KEY."""
    ids = ", ".join(map(str, check.first_unreadable))
    which = f"{check.unreadable:,} of {check.total:,} GPT-Load keys (ids {ids}…)"
    if not cipher.enabled:
        return (
            f"{which} are encrypted: give GPT-Load's ENCRYPTION_KEY with --encryption-key "
            f"or ${ENCRYPTION_KEY_VARIABLE}"
        )
    if check.plaintext == check.unreadable:
        return f"{which} are stored in plaintext: GPT-Load had no ENCRYPTION_KEY, leave it out"
    return f"{which} do not decrypt with the ENCRYPTION_KEY given: it is not GPT-Load's"


def _phase(dry_run: bool) -> AbstractContextManager[Any]:
    """One transaction per phase; a dry run writes nothing and needs none."""
    return nullcontext() if dry_run else transaction.atomic()


def _gone(number: int, what: str) -> str:
    return f", {number:,} {what} skipped" if number else ""
