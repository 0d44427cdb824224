"""`manage.py migrate_keys`: re-encrypt stored upstream keys, and the key columns of the
request logs, from one ENCRYPTION_KEY to another (REFERENCE.md §3.8), safely re-runnable
after an interruption (how: `keys.rekey`). It lives in the entry package because it
drives two apps, `keys` and `logs`.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper

from gptload.lib.crypto import Cipher
from keys.rekey import Survey, move_keys, survey_keys
from logs.rekey import move_logs

SHOWN_IDS = 5


class Command(BaseCommand):
    help = (
        "Re-encrypt every stored upstream key from --from OLD to --to NEW; an empty or omitted "
        "value means plaintext (--to NEW alone encrypts, --from OLD alone decrypts). Stop every "
        "gptload process and back up the database first. Nothing changes unless every key "
        "reads under OLD (or, after an interrupted run, already under NEW); a re-run finishes "
        "an interrupted one. The key columns of request logs are re-encrypted too (one UPDATE "
        "per distinct key, along the key-hash index); log rows that do not read under OLD are "
        "left as they are, and --skip-logs leaves all logs alone (their keys then show as "
        "undecryptable). Afterwards set ENCRYPTION_KEY to NEW and restart."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--from", dest="old", default="", metavar="OLD",
                            help="the ENCRYPTION_KEY the keys are stored under (default: plaintext)")  # fmt: skip
        parser.add_argument("--to", dest="new", default="", metavar="NEW",
                            help="the ENCRYPTION_KEY to store them under (default: plaintext)")  # fmt: skip
        parser.add_argument("--skip-logs", action="store_true",
                            help="leave the key columns of request logs as they are")  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        old_key, new_key = options["old"], options["new"]
        if old_key == new_key:
            raise CommandError("--from and --to are the same: there is nothing to migrate")
        old, new = Cipher(old_key), Cipher(new_key)
        checking = Progress(self.stdout, "Checking keys")
        survey = survey_keys(old, new, checking.show)
        checking.end()
        refuse_unless_ready(survey)
        moving = Progress(self.stdout, "Re-encrypting keys", survey.to_move)
        moved = move_keys(old, new, moving.show)
        moving.end()
        self.stdout.write(
            f"Keys: {moved} re-encrypted, {survey.done} already under the new key, "
            f"{survey.total} in all."
        )
        if not options["skip_logs"]:
            rewriting = Progress(self.stdout, "Re-encrypting request logs")
            logs = move_logs(old, new, rewriting.show)
            rewriting.end()
            kept = f", {logs.unreadable} not under --from left as they were" * bool(logs.unreadable)
            self.stdout.write(f"Request logs: {logs.moved} rows re-encrypted{kept}.")
        target = "set ENCRYPTION_KEY to the --to value" if new_key else "unset ENCRYPTION_KEY"
        self.stdout.write(self.style.SUCCESS(f"Done. Now {target} and restart gptload."))


def refuse_unless_ready(survey: Survey) -> None:
    if survey.unreadable:
        raise CommandError(
            f"{len(survey.unreadable)} of {survey.total} keys do not decrypt with --from (nor "
            f"with --to); nothing was changed. Check --from (empty means plaintext). Key ids: "
            f"{shown(survey.unreadable)}"
        )
    if survey.clashes:
        raise CommandError(
            f"{len(survey.clashes)} keys are stored twice in their group, once under each "
            f"key; delete one copy and run again. Nothing was changed. Key ids (under --from): "
            f"{shown(survey.clashes)}"
        )


def shown(ids: list[int]) -> str:
    more = f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else ""
    return ", ".join(map(str, ids[:SHOWN_IDS])) + more


class Progress:
    """A one-line counter on a terminal, redrawn at most ten times a second; silent elsewhere."""

    def __init__(self, out: OutputWrapper, label: str, total: int | None = None) -> None:
        self.out, self.label, self.total = out, label, total
        self.enabled = out.isatty()
        self._drawn = 0.0

    def show(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._drawn < 0.1:
            return
        self._drawn = now
        of = f"/{self.total} ({100 * done // max(self.total, 1)}%)" if self.total else ""
        self.out.write(f"\r{self.label}: {done}{of}", ending="")
        self.out.flush()

    def end(self) -> None:
        if self.enabled and self._drawn:
            self.out.write("\r\033[K", ending="")
            self.out.flush()
