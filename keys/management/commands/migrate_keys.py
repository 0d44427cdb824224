"""`manage.py migrate_keys`: re-encrypt stored upstream keys from one ENCRYPTION_KEY to
another (REFERENCE.md §3.8), safely re-runnable after an interruption.

Each row is judged on its own: it is *under* a key when its value decrypts with that key
and its hash is that key's hash of the plaintext (for plaintext, "decrypting" is the
identity, so the hash alone decides). Rows under OLD are rewritten, value and hash in one
UPDATE; rows already under NEW are skipped. A run cut short therefore leaves every row
wholly under OLD or wholly under NEW, and the next run finishes the job.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper
from django.db import transaction

from gptload.lib.crypto import Cipher, DecryptionError
from keys.models import APIKey
from logs.models import RequestLog
from settings_app.models import ConfigVersion

BATCH = 1000
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
        survey = survey_keys(old, new, Progress(self.stdout, "Checking keys"))
        refuse_unless_ready(survey)
        moved = move_keys(old, new, Progress(self.stdout, "Re-encrypting keys", survey.to_move))
        self.stdout.write(
            f"Keys: {moved} re-encrypted, {survey.done} already under the new key, "
            f"{survey.total} in all."
        )
        if not options["skip_logs"]:
            logs = move_logs(old, new, Progress(self.stdout, "Re-encrypting request logs"))
            kept = f", {logs.unreadable} not under --from left as they were" * bool(logs.unreadable)
            self.stdout.write(f"Request logs: {logs.moved} rows re-encrypted{kept}.")
        target = "set ENCRYPTION_KEY to the --to value" if new_key else "unset ENCRYPTION_KEY"
        self.stdout.write(self.style.SUCCESS(f"Done. Now {target} and restart gptload."))


def read(cipher: Cipher, stored: str, key_hash: str) -> str | None:
    """The plaintext of a stored key if it was written under `cipher`, else None."""
    try:
        plain = cipher.decrypt(stored)
    except DecryptionError:
        return None
    return plain if hmac.compare_digest(cipher.hash(plain), key_hash) else None


def key_batches() -> Iterator[list[tuple[int, int, str, str]]]:
    """`(id, group id, value, hash)` rows by ascending id, 1000 at a time (keyset paging)."""
    after = 0
    while True:
        rows = list(
            APIKey.objects.filter(pk__gt=after)
            .order_by("pk")
            .values_list("pk", "group_id", "key_value", "key_hash")[:BATCH]
        )
        if not rows:
            return
        yield rows
        after = rows[-1][0]


@dataclass
class Survey:
    total: int = 0
    to_move: int = 0
    done: int = 0
    unreadable: list[int] = field(default_factory=list)
    clashes: list[int] = field(default_factory=list)


def survey_keys(old: Cipher, new: Cipher, progress: Progress) -> Survey:
    """Counts keys under OLD and under NEW; collects those under neither, and those whose
    new hash another key of their group already has (the unique constraint would fail)."""
    survey = Survey()
    for rows in key_batches():
        moving: dict[tuple[int, str], int] = {}
        for key_id, group_id, stored, key_hash in rows:
            plain = read(old, stored, key_hash)
            if plain is not None:
                moving[(group_id, new.hash(plain))] = key_id
            elif read(new, stored, key_hash) is not None:
                survey.done += 1
            else:
                survey.unreadable.append(key_id)
        survey.to_move += len(moving)
        survey.total += len(rows)
        taken = APIKey.objects.filter(key_hash__in=[h for _, h in moving]).values_list(
            "group_id", "key_hash", "pk"
        )
        survey.clashes += [moving[(g, h)] for g, h, pk in taken if moving.get((g, h), pk) != pk]
        progress.show(survey.total)
    progress.end()
    return survey


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


def move_keys(old: Cipher, new: Cipher, progress: Progress) -> int:
    """Rewrites keys under OLD, 1000 per transaction; returns how many it rewrote."""
    moved = 0
    for rows in key_batches():
        changed = []
        for key_id, _, stored, key_hash in rows:
            plain = read(old, stored, key_hash)
            if plain is not None:
                changed.append(
                    APIKey(pk=key_id, key_value=new.encrypt(plain), key_hash=new.hash(plain))
                )
        if changed:
            with transaction.atomic():
                APIKey.objects.bulk_update(changed, ["key_value", "key_hash"])
            moved += len(changed)
            progress.show(moved)
    progress.end()
    if moved:
        ConfigVersion.bump()  # bulk_update sends no signals
    return moved


@dataclass
class LogMove:
    moved: int = 0
    unreadable: int = 0


def move_logs(old: Cipher, new: Cipher, progress: Progress) -> LogMove:
    """Rewrites the key columns of request logs under OLD, one UPDATE per distinct stored
    key, walking the distinct hashes along the `(key_hash, timestamp)` index."""
    result = LogMove()
    after = ""
    while True:
        hashes = list(
            RequestLog.objects.filter(key_hash__gt=after)
            .order_by("key_hash")
            .values_list("key_hash", flat=True)
            .distinct()[:BATCH]
        )
        if not hashes:
            break
        pairs = (
            RequestLog.objects.filter(key_hash__in=hashes)
            .order_by()
            .values_list("key_hash", "key_value")
            .distinct()
        )
        for key_hash, stored in pairs:
            plain = read(old, stored, key_hash)
            rows = RequestLog.objects.filter(key_hash=key_hash, key_value=stored)
            if plain is not None:
                result.moved += rows.update(key_value=new.encrypt(plain), key_hash=new.hash(plain))
            elif read(new, stored, key_hash) is None:
                result.unreadable += rows.count()
        after = hashes[-1]
        progress.show(result.moved)
    progress.end()
    return result


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
