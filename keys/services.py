"""Bulk key operations: read pasted key text, import, delete, restore, clear and export.

Plain functions shared by the REST API, the Celery jobs and the `manage.py` commands.
Writes go in batches of `BATCH` rows (an IN list or an id range per statement, never
one giant statement: MySQL caps placeholders at 65,535 and SQLite at 32,766), each batch
its own transaction unless the caller holds one. Bulk writes skip the per-row signals,
so every function that changes keys moves the configuration version once itself.

Refusals are worded in the active language: the caller's in an API request, English in a
worker or a command (no language is active there).
"""

from __future__ import annotations

import codecs
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar, cast

from django.db import connections, transaction
from django.db.models import Field, QuerySet
from django.db.models.constants import OnConflict
from django.utils import timezone
from django.utils.translation import gettext as _

from gptload.lib.crypto import DecryptionError, current_cipher
from keys.models import APIKey, APIKeyQuerySet, Group, KeyStatus, KeyTally
from settings_app.changes import group_changed

T = TypeVar("T")
BATCH = 1000
MAX_KEY_LENGTH = 1000
SYNC_LIMIT = 5000  # keys per synchronous call, as GPT-Load
SEPARATORS = re.compile(r"[\s,;]+")
POSITIONS_SHOWN = 5  # positions of refused keys named in the refusal
READ_CHUNK = 64 * 1024  # bytes of an uploaded key file read at a time
EXPORT_STATUSES = ("all", *KeyStatus.values)

Progress = Callable[[int, int], None]


class KeyOperationError(ValueError):
    """A key operation refused as asked; the message says what to change."""


class KeyTextError(KeyOperationError):
    """Key text that cannot be used as it is (nothing was stored)."""


def parse_keys(text: str) -> list[str]:
    """The keys in pasted text or a file, in order, repeats included.

    A JSON array of strings is taken as the list; any other text is split on runs of
    whitespace, commas and semicolons (a leading UTF-8 BOM is dropped). Raises
    `KeyTextError` when no key is found, or naming how many keys are refused and why
    (longer than `MAX_KEY_LENGTH`, control or invisible characters).
    """
    reader = KeyReader()
    keys = reader.feed(text) + reader.close()
    reader.check()
    return keys


class KeyReader:
    """`parse_keys` for text that arrives in pieces (an upload read a chunk at a time), so
    that a 16 MiB file is never held whole: `feed` returns the keys each piece completes
    (a key cut by a piece's end waits for its rest), `close` the last ones, and `check`
    refuses the whole text as `parse_keys` does. A text that opens with `[` is read as a
    JSON array, whole, at `close`.
    """

    def __init__(self) -> None:
        self.count = self.refused = 0  # keys read; keys refused
        self.too_long: list[int] = []  # positions (from 1), the first few
        self.unprintable: list[int] = []
        self.too_long_count = self.unprintable_count = 0
        self._tail = ""
        self._started = False
        self._json: list[str] | None = None

    def feed(self, text: str) -> list[str]:
        if not self._started:
            text = text.removeprefix("\ufeff").lstrip()
            if not text:
                return []
            self._started = True
            if text.startswith("["):
                self._json = []
        if self._json is not None:
            self._json.append(text)
            return []
        tokens = SEPARATORS.split(self._tail + text)
        self._tail = tokens.pop()  # the text may go on in the next piece
        return self._take(tokens)

    def close(self) -> list[str]:
        if self._json is not None:
            text, self._json = "".join(self._json), None
            tokens = _json_array(text)
            return self._take(SEPARATORS.split(text) if tokens is None else tokens)
        tail, self._tail = self._tail, ""
        return self._take([tail])

    def _take(self, tokens: list[str]) -> list[str]:
        keys = [token for token in tokens if token]
        for key in keys:
            self.count += 1
            long, odd = len(key) > MAX_KEY_LENGTH, _has_control_characters(key)
            if long:
                self.too_long_count += 1
                if len(self.too_long) < POSITIONS_SHOWN:
                    self.too_long.append(self.count)
            if odd:
                self.unprintable_count += 1
                if len(self.unprintable) < POSITIONS_SHOWN:
                    self.unprintable.append(self.count)
            self.refused += long or odd
        return keys

    def check(self) -> None:
        """Raises `KeyTextError` when no key was read, or when any is refused."""
        if not self.count:
            raise KeyTextError(
                _(
                    "No keys found: send keys separated by new lines, spaces, commas or "
                    "semicolons, or a JSON array of strings."
                )
            )
        if not self.refused:
            return
        reasons = []
        if self.too_long_count:
            reasons.append(
                _("%(count)d longer than %(limit)d characters (%(positions)s)")
                % {
                    "count": self.too_long_count,
                    "limit": MAX_KEY_LENGTH,
                    "positions": _positions(self.too_long, self.too_long_count),
                }
            )
        if self.unprintable_count:
            reasons.append(
                _("%(count)d containing control or invisible characters (%(positions)s)")
                % {
                    "count": self.unprintable_count,
                    "positions": _positions(self.unprintable, self.unprintable_count),
                }
            )
        raise KeyTextError(
            _(
                "%(refused)d of %(total)d keys refused: %(reasons)s. "
                "Fix or remove them and send the list again; nothing was stored."
            )
            % {"refused": self.refused, "total": self.count, "reasons": "; ".join(reasons)}
        )


def decoded(chunks: Iterable[bytes]) -> Iterator[str]:
    """The text of a UTF-8 file read in chunks (a leading BOM dropped), a piece per chunk;
    a character cut by a chunk's end is completed by the next. Raises `KeyTextError` on
    bytes that are not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    try:
        for chunk in chunks:
            yield decoder.decode(chunk)
        yield decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise KeyTextError(_("file: the file is not UTF-8 text.")) from None


def _json_array(text: str) -> list[str] | None:
    if not text.lstrip().startswith("["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None  # GPT-Load splits what is not a JSON array, brackets and all
    if not isinstance(value, list):
        return None
    if not all(isinstance(item, str) for item in value):
        raise KeyTextError(_("The JSON array must hold only strings (one key each)."))
    return [item.strip() for item in value]


def _has_control_characters(key: str) -> bool:
    if key.isascii():  # the usual case, 20x faster than looking at each character
        return not key.isprintable()
    return any(unicodedata.category(char) in ("Cc", "Cf") for char in key)


def _positions(numbers: list[int], count: int) -> str:
    shown = ", ".join(f"#{n}" for n in numbers[:POSITIONS_SHOWN])
    return _("keys %(numbers)s") % {"numbers": f"{shown}{', …' if count > POSITIONS_SHOWN else ''}"}


def check_sync_limit(keys: Sequence[str], alternative: str) -> None:
    if len(keys) > SYNC_LIMIT:
        raise KeyTextError(
            _("batch size exceeds the limit of %(limit)d keys (%(count)d sent): %(alternative)s")
            % {"limit": SYNC_LIMIT, "count": len(keys), "alternative": alternative}
        )


def ensure_holds_keys(group: Group) -> None:
    """Raises `KeyOperationError` for an aggregate group, whose keys are its members'."""
    if group.is_aggregate:
        raise KeyOperationError(
            _("%(name)s is an aggregate group: its keys belong to its member groups.")
            % {"name": group.name}
        )


def import_keys(
    group: Group,
    keys: Iterable[str],
    progress: Progress | None = None,
    total: int | None = None,
) -> dict[str, int]:
    """Adds the keys the group does not hold yet (compared by hash), as active keys.

    Returns GPT-Load's `{added_count, ignored_count, total_in_group}`; repeats within
    `keys` and keys already in the group are ignored. `keys` is read once, `BATCH` at a
    time (an iterator works: a job reads its list part by part); each batch asks which of
    its hashes the group holds and inserts the rest, so memory stays flat however big the
    list or the group. `total` (else `len(keys)`) is what progress is reported against.
    """
    ensure_holds_keys(group)
    cipher = current_cipher()
    if total is None:
        total = len(keys) if isinstance(keys, Sized) else 0
    report = progress or _ignore
    report(0, total)
    added = done = 0
    for batch in batches(keys, BATCH):
        fresh: dict[str, str] = {}
        for key in batch:
            fresh.setdefault(cipher.hash(key), key)
        held = set(
            APIKey.objects.filter(group=group, key_hash__in=list(fresh)).values_list(
                "key_hash", flat=True
            )
        )
        rows = [
            (cipher.encrypt(key), digest) for digest, key in fresh.items() if digest not in held
        ]
        if rows:
            with transaction.atomic():
                added += _insert_active_keys(group, rows)
        done += len(batch)
        report(done, max(total, done))
    if added:
        group_changed(group.pk)
    return {"added_count": added, "ignored_count": done - added,
            "total_in_group": count_keys(group)}  # fmt: skip


def delete_keys(
    group: Group, keys: Sequence[str], progress: Progress | None = None
) -> dict[str, int]:
    """Deletes the group's keys among `keys` (matched by hash).

    Returns `{deleted_count, ignored_count, total_in_group}`; keys the group does not
    hold (and repeats) are ignored.
    """
    hashes = _unique_hashes(keys)
    report = progress or _ignore
    done = len(keys) - len(hashes)  # repeats
    report(done, len(keys))
    deleted = 0
    for chunk in chunks(hashes, BATCH):
        with transaction.atomic():
            deleted += _delete_rows(APIKey.objects.filter(group=group, key_hash__in=chunk))
        done += len(chunk)
        report(done, len(keys))
    if deleted:
        group_changed(group.pk)
    return {"deleted_count": deleted, "ignored_count": len(keys) - deleted,
            "total_in_group": count_keys(group)}  # fmt: skip


RESTORED = {"status": KeyStatus.ACTIVE, "cooling_until": None, "consecutive_failures": 0,
            "last_error": ""}  # fmt: skip


def restore_keys(group: Group, keys: Sequence[str]) -> dict[str, int]:
    """Makes the listed invalid keys active again, their failure streak forgotten.

    Returns `{restored_count, ignored_count, total_in_group}`; keys that are not
    invalid (or not in the group) are ignored.
    """
    restored = 0
    for chunk in chunks(_unique_hashes(keys), BATCH):
        now = timezone.now()
        with transaction.atomic():
            restored += APIKey.objects.filter(
                group=group, key_hash__in=chunk, status=KeyStatus.INVALID
            ).update(**RESTORED, status_changed_at=now, updated_at=now)
    if restored:
        group_changed(group.pk)
    return {"restored_count": restored, "ignored_count": len(keys) - restored,
            "total_in_group": count_keys(group)}  # fmt: skip


def restore_all_invalid(group: Group) -> int:
    """Makes every invalid key of the group active again; returns how many."""
    rows = APIKey.objects.filter(group=group, status=KeyStatus.INVALID)

    def restore(batch: QuerySet[APIKey]) -> int:
        now = timezone.now()
        return batch.update(**RESTORED, status_changed_at=now, updated_at=now)

    restored = _in_id_ranges(rows, restore)
    if restored:
        group_changed(group.pk)
    return restored


def clear_keys(group: Group, status: str = "all", progress: Progress | None = None) -> int:
    """Deletes the group's keys in `status` (or all of them); returns how many.

    Works through id ranges of `BATCH` keys, each deleted in its own short
    transaction, so 100,000 keys never hold a lock for long nor build a giant statement.
    """
    rows = APIKey.objects.filter(group=group, **status_filter(status))
    deleted = _in_id_ranges(rows, _delete_rows, progress)
    if deleted:
        group_changed(group.pk)
    return deleted


def status_filter(status: str) -> dict[str, Any]:
    if status == "all":
        return {}
    if status not in KeyStatus.values:
        raise KeyOperationError(
            _("Unknown key status %(status)s: use %(choices)s.")
            % {"status": repr(status), "choices": ", ".join(EXPORT_STATUSES)}
        )
    return {"status": status}


def count_keys(group: Group) -> int:
    """The group's keys in all (from the tally: a million keys are not counted)."""
    return sum(KeyTally.objects.by_group([group.pk]).get(group.pk, {}).values())


@dataclass(frozen=True)
class ExportBatch:
    last_id: int | None  # None: nothing more to export
    text: str  # the decrypted keys, one per line
    count: int
    undecryptable: int


def export_batch(group_id: int, status: str, after: int) -> ExportBatch:
    """The next `BATCH` keys (by id, after `after`) of a group, decrypted, one per line.

    Keys stored under another ENCRYPTION_KEY are left out and counted.
    """
    cipher = current_cipher()
    rows = list(
        APIKey.objects.filter(group_id=group_id, id__gt=after, **status_filter(status))
        .order_by("id")
        .values_list("id", "key_value")[:BATCH]
    )
    if not rows:
        return ExportBatch(None, "", 0, 0)
    secrets: list[str] = []
    for _id, stored in rows:
        try:
            secrets.append(cipher.decrypt(stored))
        except DecryptionError:
            continue
    text = "".join(f"{secret}\n" for secret in secrets)
    return ExportBatch(rows[-1][0], text, len(secrets), len(rows) - len(secrets))


def export_keys(group_id: int, status: str = "all") -> Iterator[ExportBatch]:
    """Every batch of a group's keys in `status`, for streaming to a file or a response."""
    after = 0
    while (batch := export_batch(group_id, status, after)).last_id is not None:
        yield batch
        after = batch.last_id


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last one shorter), read as they are needed."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


INSERTED_COLUMNS = ("group", "key_value", "key_hash", "status", "consecutive_failures",
                    "failure_count", "request_count", "last_error", "notes",
                    "status_changed_at", "created_at", "updated_at")  # fmt: skip


def _insert_active_keys(group: Group, rows: Sequence[tuple[str, str]]) -> int:
    """Inserts `(stored value, hash)` rows as active keys, skipping hashes the group
    holds; returns how many were inserted.

    One `executemany` of a plain INSERT: `bulk_create` prepares every value of every
    field in Python and, on SQLite, sends 71 rows per statement; this is 3-4x faster
    (100,000 keys in ~7 s instead of ~24 s on a busy 2-core machine). The (group,
    key_hash) unique index makes a key added meanwhile by someone else a no-op.
    """
    connection = connections[APIKey.objects.db]
    fields = [_concrete(name) for name in INSERTED_COLUMNS]
    now = fields[-1].get_db_prep_save(timezone.now(), connection)
    quote = connection.ops.quote_name
    sql = (
        f"{connection.ops.insert_statement(on_conflict=OnConflict.IGNORE)} "
        f"{quote(APIKey._meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))}) "
        f"{connection.ops.on_conflict_suffix_sql(fields, OnConflict.IGNORE, None, None)}"
    ).strip()
    values = [(group.pk, stored, digest, KeyStatus.ACTIVE.value, 0, 0, 0, "", "", now, now, now)
              for stored, digest in rows]  # fmt: skip
    with connection.cursor() as cursor:
        cursor.executemany(sql, values)
        added = cursor.rowcount if cursor.rowcount >= 0 else len(values)
    KeyTally.objects.add({(group.pk, KeyStatus.ACTIVE.value): added})
    return added


def _concrete(name: str) -> Field[Any, Any]:
    return cast("Field[Any, Any]", APIKey._meta.get_field(name))  # every name is a column


def _unique_hashes(keys: Sequence[str]) -> list[str]:
    cipher = current_cipher()
    return list(dict.fromkeys(cipher.hash(key) for key in keys))


def _delete_rows(rows: QuerySet[APIKey]) -> int:
    # A plain DELETE: `QuerySet.delete()` would load every key and send a post_delete
    # signal (a version bump) per row, since settings_app listens to APIKey deletes.
    return cast("APIKeyQuerySet", rows).remove()


def _in_id_ranges(
    rows: QuerySet[APIKey],
    apply: Callable[[QuerySet[APIKey]], int],
    progress: Progress | None = None,
) -> int:
    """Applies `apply` to `rows` one id range of up to `BATCH` rows at a time."""
    report = progress or _ignore
    total = rows.count() if progress else 0
    done, last = 0, 0
    while ids := list(rows.filter(id__gt=last).order_by("id").values_list("id", flat=True)[:BATCH]):
        with transaction.atomic():
            done += apply(rows.filter(id__gte=ids[0], id__lte=ids[-1]))
        last = ids[-1]
        report(min(done, total), total)
    return done


def _ignore(processed: int, total: int) -> None:
    return None
