"""Re-encrypting stored upstream keys from one ENCRYPTION_KEY to another.

Each row is judged on its own: it is *under* a key when its value decrypts with that key
and its hash is that key's hash of the plaintext (for plaintext, "decrypting" is the
identity, so the hash alone decides). Rows under OLD are rewritten, value and hash in one
UPDATE; rows already under NEW are skipped. A run cut short therefore leaves every row
wholly under OLD or wholly under NEW, and the next run finishes the job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from django.db import transaction

from gptload.lib.crypto import Cipher, read_under
from keys.models import APIKey
from settings_app.changes import config_changed

BATCH = 1000


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


def survey_keys(old: Cipher, new: Cipher, progress: Callable[[int], None]) -> Survey:
    """Counts keys under OLD and under NEW; collects those under neither, and those whose
    new hash another key of their group already has (the unique constraint would fail)."""
    survey = Survey()
    for rows in key_batches():
        moving: dict[tuple[int, str], int] = {}
        for key_id, group_id, stored, key_hash in rows:
            plain = read_under(old, stored, key_hash)
            if plain is not None:
                moving[(group_id, new.hash(plain))] = key_id
            elif read_under(new, stored, key_hash) is not None:
                survey.done += 1
            else:
                survey.unreadable.append(key_id)
        survey.to_move += len(moving)
        survey.total += len(rows)
        taken = APIKey.objects.filter(key_hash__in=[h for _, h in moving]).values_list(
            "group_id", "key_hash", "pk"
        )
        survey.clashes += [moving[(g, h)] for g, h, pk in taken if moving.get((g, h), pk) != pk]
        progress(survey.total)
    return survey


def move_keys(old: Cipher, new: Cipher, progress: Callable[[int], None]) -> int:
    """Rewrites keys under OLD, 1000 per transaction; returns how many it rewrote."""
    moved = 0
    for rows in key_batches():
        changed = []
        for key_id, _, stored, key_hash in rows:
            plain = read_under(old, stored, key_hash)
            if plain is not None:
                changed.append(
                    APIKey(pk=key_id, key_value=new.encrypt(plain), key_hash=new.hash(plain))
                )
        if changed:
            with transaction.atomic():
                APIKey.objects.bulk_update(changed, ["key_value", "key_hash"])
            moved += len(changed)
            progress(moved)
    if moved:
        config_changed()  # every pool; bulk_update sends no signals
    return moved
