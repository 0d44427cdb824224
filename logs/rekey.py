"""Re-encrypting the key columns of request logs from one ENCRYPTION_KEY to another."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gptload.lib.crypto import Cipher, read_under
from logs.models import RequestLog

BATCH = 1000


@dataclass
class LogMove:
    moved: int = 0
    unreadable: int = 0


def move_logs(old: Cipher, new: Cipher, progress: Callable[[int], None]) -> LogMove:
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
            plain = read_under(old, stored, key_hash)
            rows = RequestLog.objects.filter(key_hash=key_hash, key_value=stored)
            if plain is not None:
                result.moved += rows.update(key_value=new.encrypt(plain), key_hash=new.hash(plain))
            elif read_under(new, stored, key_hash) is None:
                result.unreadable += rows.count()
        after = hashes[-1]
        progress(result.moved)
    return result
