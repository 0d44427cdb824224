"""Request logs and hourly statistics read from a GPT-Load 1.x database
(`manage.py import_gptload --with-logs`).

The command hands over a batch of rows at a time (the tables can hold millions) and
each batch is stored in its own transaction, so an interrupted import keeps what it
stored and a re-run adds only the rest: a log row keeps GPT-Load's id (a UUID), an
hourly row is matched by hour and group. Group ids are translated to ours; the upstream
key of a log row is decrypted with GPT-Load's ENCRYPTION_KEY and stored under ours (a
row whose key does not decrypt keeps no key, as GPT-Load showed it: undecryptable).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import transaction

from gptload.lib import gptload_db as db
from gptload.lib.crypto import Cipher, DecryptionError, current_cipher
from logs.models import HourlyStat, RequestLog, RequestType

LOG_COLUMNS = ("id", "timestamp", "group_id", "group_name", "parent_group_id",
               "parent_group_name", "key_value", "key_hash", "model", "is_success",
               "source_ip", "status_code", "request_path", "duration_ms", "error_message",
               "user_agent", "request_type", "upstream_addr", "is_stream", "request_body")  # fmt: skip
HOURLY_COLUMNS = ("id", "time", "group_id", "success_count", "failure_count")
MAX_STATUS = 32767  # PositiveSmallIntegerField on every database
MAX_DURATION = 2**31 - 1
# GPT-Load ids are UUIDs; anything else gets a stable UUID of its own, so a re-run
# recognises the row.
FOREIGN_IDS = uuid.UUID("0d6c3c2e-7f0e-4a38-9a55-6f6a3b1f2c10")


@dataclass
class LogTally:
    added: int = 0
    present: int = 0  # stored by an earlier run
    skipped: int = 0  # hourly rows of groups that no longer exist, rows without a time
    keyless: int = 0  # log rows whose key did not decrypt

    def __iadd__(self, other: LogTally) -> LogTally:
        self.added += other.added
        self.present += other.present
        self.skipped += other.skipped
        self.keyless += other.keyless
        return self


def import_logs(
    rows: Sequence[Mapping[str, Any]],
    group_ids: Mapping[int, int],
    source: Cipher,
    *,
    dry_run: bool,
) -> LogTally:
    """Stores a batch of GPT-Load `request_logs` rows not stored yet. `group_ids` maps
    GPT-Load's group ids to ours (a group gone from both keeps its name, no id)."""
    ours = current_cipher()
    tally = LogTally()
    logs = {}
    for row in rows:
        log = _log(row, group_ids, source, ours)
        if log is None:
            tally.skipped += 1
            continue
        tally.keyless += bool(db.text_value(row.get("key_value")) and not log.key_value)
        logs[log.id] = log
    present = set(RequestLog.objects.filter(id__in=list(logs)).values_list("id", flat=True))
    fresh = [log for log_id, log in logs.items() if log_id not in present]
    tally.present, tally.added = len(logs) - len(fresh), len(fresh)
    if fresh and not dry_run:
        with transaction.atomic():
            RequestLog.objects.bulk_create(fresh, ignore_conflicts=True)
    return tally


def _log(
    row: Mapping[str, Any], group_ids: Mapping[int, int], source: Cipher, ours: Cipher
) -> RequestLog | None:
    timestamp = db.time_value(row.get("timestamp"))
    if timestamp is None:
        return None
    secret = _secret(source, db.text_value(row.get("key_value")))
    request_type = db.text_value(row.get("request_type"))
    return RequestLog(
        id=_uuid(db.text_value(row["id"])),
        timestamp=timestamp,
        group_id=group_ids.get(db.int_value(row.get("group_id"))),
        group_name=db.text_value(row.get("group_name"))[:255],
        parent_group_id=group_ids.get(db.int_value(row.get("parent_group_id"))),
        parent_group_name=db.text_value(row.get("parent_group_name"))[:255],
        key_value=ours.encrypt(secret) if secret else "",
        key_hash=ours.hash(secret) if secret else "",
        model=db.text_value(row.get("model"))[:255],
        is_success=db.bool_value(row.get("is_success")),
        source_ip=db.text_value(row.get("source_ip"))[:64],
        status_code=min(max(db.int_value(row.get("status_code")), 0), MAX_STATUS),
        request_path=db.text_value(row.get("request_path"))[:500],
        duration_ms=min(max(db.int_value(row.get("duration_ms")), 0), MAX_DURATION),
        error_message=db.text_value(row.get("error_message")),
        user_agent=db.text_value(row.get("user_agent"))[:512],
        request_type=request_type if request_type in RequestType.values else RequestType.FINAL,
        upstream_addr=db.text_value(row.get("upstream_addr"))[:500],
        is_stream=db.bool_value(row.get("is_stream")),
        request_body=db.text_value(row.get("request_body")),
    )


def _secret(source: Cipher, stored: str) -> str:
    if not stored:
        return ""
    try:
        return source.decrypt(stored)
    except DecryptionError:
        return ""


def _uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        return uuid.uuid5(FOREIGN_IDS, text)


def import_hourly(
    rows: Sequence[Mapping[str, Any]], group_ids: Mapping[int, int], *, dry_run: bool
) -> LogTally:
    """Stores a batch of GPT-Load `group_hourly_stats` rows for hours and groups that
    have none here yet (GPT-Load counted no models: ours are stored under model "")."""
    tally = LogTally()
    stats: dict[tuple[Any, int], HourlyStat] = {}
    for row in rows:
        group_id = group_ids.get(db.int_value(row.get("group_id")))
        hour = db.time_value(row.get("time"))
        if group_id is None or hour is None:
            tally.skipped += 1
            continue
        stats[(hour, group_id)] = HourlyStat(
            time=hour,
            group_id=group_id,
            model="",
            success_count=max(db.int_value(row.get("success_count")), 0),
            failure_count=max(db.int_value(row.get("failure_count")), 0),
        )
    if not stats:
        return tally
    hours = {hour for hour, _ in stats}
    present = set(
        HourlyStat.objects.filter(
            time__in=hours, model="", group_id__in={g for _, g in stats}
        ).values_list("time", "group_id")
    )
    fresh = [stat for place, stat in stats.items() if place not in present]
    tally.present += len(stats) - len(fresh)
    tally.added += len(fresh)
    if fresh and not dry_run:
        with transaction.atomic():
            HourlyStat.objects.bulk_create(fresh, ignore_conflicts=True)
    return tally
