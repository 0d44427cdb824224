"""Fills the request log with millions of plausible rows, and the hourly statistics with
their rollups, for bench/keys.py's console pages (issue 10: 10 M rows).

It runs as a module from the project root (or with it on PYTHONPATH), with the project's
environment (DATABASE_DSN, ENCRYPTION_KEY, …), so that the
rows name real keys of the benchmark's groups the way the proxy stores them: the key
encrypted like the key list's, and its hash. The first rows (up to --base) are written
through `logs.writer.insert_logs`, the proxy's own insert; the rest are copies made by
the database itself (INSERT … SELECT, doubling each round, each copy a new id and its
time moved back up to half an hour), which writes millions of rows in minutes.

  python -m bench.seed_logs --rows 10000000 --keys-file keys.txt --group 1:bench-command

It prints one JSON line: rows written, hourly rollups, seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

DAYS = 7  # spread over the default request_log_retention_days
KEYS_USED = 1000  # distinct upstream keys named by the rows
MODELS = ("gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o3-mini", "gpt-4o")
# (status, share, error text): mostly successes, the failures real providers send
OUTCOMES = (
    (200, 0.92, ""),
    (429, 0.04, "Rate limit reached for gpt-4o-mini in organization org-bench on requests "
                "per min (RPM): Limit 500, Used 500, Requested 1."),
    (500, 0.02, "The server had an error while processing your request. Sorry about that!"),
    (401, 0.01, "Incorrect API key provided: sk-a…wxyz. You can find your API key at "
                "https://platform.openai.com/account/api-keys."),
    (502, 0.01, "upstream broke off: ServerDisconnectedError"),
)  # fmt: skip
SHIFT_S = 1800  # a copied row's time moves back by up to this much


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--base", type=int, default=100_000, help="rows written row by row")
    parser.add_argument("--keys-file", type=Path, required=True)
    parser.add_argument("--group", action="append", required=True, metavar="ID:NAME")
    parser.add_argument("--seed", type=int, default=10)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import os

    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gptload.settings")
    django.setup()
    from django.db import connection, transaction

    from gptload.lib.crypto import current_cipher
    from gptload.lib.providers.base import Usage
    from logs.models import RequestLog
    from logs.writer import LogEntry, insert_logs

    started = time.perf_counter()
    rng = random.Random(args.seed)
    cipher = current_cipher()
    with args.keys_file.open() as lines:
        secrets = [line.strip() for _, line in zip(range(KEYS_USED), lines, strict=False)]
    keys = [(cipher.encrypt(secret), cipher.hash(secret)) for secret in secrets]
    groups = [(int(i), name) for i, name in (g.split(":", 1) for g in args.group)]
    statuses = [o[0] for o in OUTCOMES]
    shares = [o[1] for o in OUTCOMES]
    errors = {status: error for status, _, error in OUTCOMES}
    now = time.time()

    def entry() -> LogEntry:
        status = rng.choices(statuses, shares)[0]
        group_id, group_name = rng.choice(groups)
        stored, hashed = rng.choice(keys)
        ok = status == 200
        return LogEntry(
            timestamp=now - rng.random() * DAYS * 86400, group_id=group_id,
            group_name=group_name, parent_group_id=None, parent_group_name="", key_id=None,
            key_stored=stored, key_hash=hashed, model=rng.choice(MODELS), status=status,
            error=errors[status], final=ok or rng.random() < 0.5,
            duration_ms=rng.randint(150, 4000), source_ip=f"10.0.{rng.randint(0, 9)}.{rng.randint(1, 250)}",
            request_path=f"/proxy/{group_name}/v1/chat/completions", upstream="http://127.0.0.1:9",
            stream=rng.random() < 0.4, user_agent="OpenAI/Python 2.8.1",
            usage=Usage(rng.randint(10, 2000), rng.randint(10, 1000)) if ok else None,
        )  # fmt: skip

    # Indexes are built once at the end (a sort each) rather than kept up to date row by
    # row: ten times faster at 10 M rows, and the same indexes the migrations make.
    indexes = list(RequestLog._meta.indexes)
    with connection.schema_editor() as editor:
        for index in indexes:
            editor.remove_index(RequestLog, index)
    base = min(args.base, args.rows)
    for start in range(0, base, 5000):
        with transaction.atomic():
            insert_logs([entry() for _ in range(min(5000, base - start))])
    written = base
    table = RequestLog._meta.db_table
    columns = [f.column for f in RequestLog._meta.concrete_fields]
    copied = [c for c in columns if c not in ("id", "timestamp")]
    if connection.vendor == "mysql":
        native = connection.features.has_native_uuid_field
        new_id = "UUID()" if native else "REPLACE(UUID(), '-', '')"
        moved = f"`timestamp` - INTERVAL FLOOR(RAND() * {SHIFT_S}) SECOND"
    else:
        new_id = "lower(hex(randomblob(16)))"
        moved = f"datetime(\"timestamp\", '-' || (abs(random()) % {SHIFT_S}) || ' seconds')"
    quote = connection.ops.quote_name
    names = ", ".join(quote(c) for c in ["id", "timestamp", *copied])
    picked = ", ".join([new_id, moved, *(quote(c) for c in copied)])
    while written < args.rows:
        batch = min(written, args.rows - written)
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({names}) SELECT {picked} FROM {table} LIMIT {batch}"  # noqa: S608 - our own names
            )
        written += batch
        say(f"  {written:,} rows ({time.perf_counter() - started:.0f} s)")
    say(f"  building {len(indexes)} indexes...")
    if connection.vendor == "mysql":
        fields = {f.name: f.column for f in RequestLog._meta.concrete_fields}
        added = ", ".join(
            f"ADD INDEX {quote(index.name)} ({', '.join(quote(fields[f]) for f in index.fields)})"
            for index in indexes
        )
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {table} {added}")  # one pass over the table for all
    else:
        with connection.schema_editor() as editor:
            for index in indexes:
                editor.add_index(RequestLog, index)
    hourly = rollups(table)
    print(json.dumps({"rows": written, "hourly_rows": hourly,
                      "seconds": round(time.perf_counter() - started, 1)}))  # fmt: skip


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def rollups(table: str) -> int:
    """The hourly statistics of final requests, as the writer keeps them, made anew."""
    from django.db import connection as db
    from django.db import transaction

    if db.vendor == "mysql":
        hour = "DATE_FORMAT(`timestamp`, '%Y-%m-%d %H:00:00')"
        now = "UTC_TIMESTAMP()"
    else:
        hour = "strftime('%Y-%m-%d %H:00:00', \"timestamp\")"
        now = "datetime('now')"
    with transaction.atomic(), db.cursor() as cursor:
        cursor.execute("DELETE FROM logs_hourlystat")
        cursor.execute(
            "INSERT INTO logs_hourlystat (time, group_id, model, success_count, failure_count, "  # noqa: S608
            "prompt_tokens, completion_tokens, total_tokens, created_at, updated_at) "
            f"SELECT {hour}, group_id, model, SUM(is_success), SUM(1 - is_success), "
            "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            f"COALESCE(SUM(total_tokens), 0), {now}, {now} FROM {table} "
            f"WHERE request_type = 'final' GROUP BY {hour}, group_id, model"
        )
        cursor.execute("SELECT COUNT(*) FROM logs_hourlystat")
        return int(cursor.fetchone()[0])


if __name__ == "__main__":
    main()
