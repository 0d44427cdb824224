"""A GPT-Load 1.x database, opened read-only, for `manage.py import_gptload`.

GPT-Load's GORM models (v1.4.9, `internal/models/types.go`) made six tables: `groups`,
`group_sub_groups`, `api_keys`, `system_settings`, `request_logs` and
`group_hourly_stats`. The same database looks different on each of its drivers, and this
module hides that:

- SQLite (glebarez/sqlite, pure Go) stores times as text such as
  `2026-07-01 12:00:00.123456789+08:00` and booleans as 0/1;
- MySQL/MariaDB stores `datetime(3)` without a zone, in the DSN's `loc`: UTC when it names
  none, GPT-Load's own `TZ` for `loc=Local` (its `.env.example` has both that and
  `TZ=Asia/Shanghai`), and JSON columns as text; PostgreSQL stores `timestamptz` and
  `json`, which psycopg decodes.

Rows are read a batch at a time in the order of their primary key (`WHERE id > last
ORDER BY id LIMIT n`), so that no table is ever held whole, whatever its size, on any of
the three databases. Columns that an older 1.x release did not have yet (`notes`,
`header_rules`, `sort`, …) read as absent; the caller gives their defaults.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gptload.lib.dsn import describe_database, parse_database
from gptload.lib.env import ConfigError

BATCH = 1000
REQUIRED_TABLES = ("groups", "api_keys")
# The wall clock of a GORM time as any of the drivers writes it: date, time, fraction up
# to nanoseconds, then an offset (`+08:00`, `+0800`, `Z`) or none (UTC).
TIME_TEXT = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?\s*(Z|[+-]\d{2}:?\d{2})?"
)


class SourceError(Exception):
    """The GPT-Load database cannot be opened or read; the message says why, in one line."""


Row = dict[str, Any]


class Source:
    """A GPT-Load database given by its `DATABASE_DSN` (any form GPT-Load accepts)."""

    def __init__(self, dsn: str, base_dir: Path, local_zone: str = "UTC") -> None:
        """`local_zone`: GPT-Load's `TZ`, the zone of MySQL times under `loc=Local`."""
        if not dsn.strip():
            raise SourceError("give GPT-Load's DATABASE_DSN with --from")
        try:
            config = parse_database(dsn, base_dir)
        except ConfigError as exc:
            raise SourceError(str(exc).replace("DATABASE_DSN", "--from", 1)) from None
        self.engine = str(config["ENGINE"]).rsplit(".", 1)[-1]
        self.description = describe_database(config)
        self.zone = _zone_of(dsn, local_zone) if self.engine == "mysql" else ZoneInfo("UTC")
        self._connection = _connect(self.engine, config, self.description)
        self._quote = "`" if self.engine == "mysql" else '"'
        self._columns: dict[str, list[str]] = {}

    def close(self) -> None:
        self._connection.close()

    def check(self) -> None:
        """Raises `SourceError` unless the database has GPT-Load's tables."""
        missing = [table for table in REQUIRED_TABLES if not self.has_table(table)]
        if missing:
            raise SourceError(
                f"{self.description} is not a GPT-Load 1.x database (no table "
                f"{', '.join(missing)}); check --from"
            )

    def has_table(self, table: str) -> bool:
        try:
            self.columns(table)
        except SourceError:
            return False
        return True

    def columns(self, table: str) -> list[str]:
        """The table's column names; raises `SourceError` if it has no such table."""
        if table not in self._columns:
            try:
                sql = f"SELECT * FROM {self.quote(table)} WHERE 1 = 0"  # noqa: S608 - our names
                cursor = self._execute(sql, ())
            except SourceError:
                self._rollback()
                raise
            self._columns[table] = [str(d[0]).lower() for d in cursor.description]
            cursor.close()
        return self._columns[table]

    def count(self, table: str) -> int:
        if not self.has_table(table):
            return 0
        sql = f"SELECT COUNT(*) FROM {self.quote(table)}"  # noqa: S608 - our names
        cursor = self._execute(sql, ())
        (number,) = cursor.fetchone()
        cursor.close()
        return int(number)

    def batches(self, table: str, columns: Sequence[str], size: int = BATCH) -> Iterator[list[Row]]:
        """The table's rows, `size` at a time in primary-key order, as dicts of the
        `columns` it has (absent ones are left out). Nothing if there is no such table."""
        if not self.has_table(table):
            return
        present = [c for c in columns if c in self.columns(table)]
        if "id" not in present:
            present.insert(0, "id")
        listed = ", ".join(self.quote(c) for c in present)
        order = f"ORDER BY {self.quote('id')} LIMIT {int(size)}"
        # Table and column names are this module's constants, never input.
        first = f"SELECT {listed} FROM {self.quote(table)} {order}"  # noqa: S608
        after = f"SELECT {listed} FROM {self.quote(table)} WHERE {self.quote('id')} > %s {order}"  # noqa: S608
        cursor = self._execute(first, ())
        while True:
            rows = [dict(zip(present, map(self._zoned, values), strict=True))
                    for values in cursor.fetchall()]  # fmt: skip
            cursor.close()
            if not rows:
                return
            yield rows
            if len(rows) < size:
                return
            cursor = self._execute(after, (rows[-1]["id"],))

    def _zoned(self, value: Any) -> Any:
        """A zoneless datetime read as a time in the database's zone."""
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=self.zone).astimezone(UTC)
        return value

    def quote(self, name: str) -> str:
        return f"{self._quote}{name}{self._quote}"

    def _execute(self, sql: str, params: tuple[Any, ...]) -> Any:
        if self.engine == "sqlite3":
            sql = sql.replace("%s", "?")
        cursor = self._connection.cursor()
        try:
            cursor.execute(sql, params)
        except Exception as exc:  # each driver has its own error classes
            cursor.close()
            raise SourceError(f"{self.description}: {_first_line(exc)}") from None
        return cursor

    def _rollback(self) -> None:
        # PostgreSQL refuses every statement after a failed one until a rollback.
        with contextlib.suppress(Exception):  # nothing to undo on a read-only connection
            self._connection.rollback()


def _zone_of(dsn: str, local_zone: str) -> ZoneInfo:
    """The zone the Go MySQL driver wrote times in: the DSN's `loc` (default UTC)."""
    query = dsn.split("?", 1)[1] if "?" in dsn else ""
    location = dict(parse_qsl(query)).get("loc", "UTC")
    name = local_zone if location == "Local" else location
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise SourceError(f"unknown time zone {name!r} (loc= in --from, or TZ)") from None


def _connect(engine: str, config: dict[str, Any], description: str) -> Any:
    try:
        if engine == "sqlite3":
            return _connect_sqlite(Path(config["NAME"]))
        if engine == "mysql":
            return _connect_mysql(config)
        if engine == "postgresql":
            return _connect_postgres(config)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"cannot open {description}: {_first_line(exc)}") from None
    raise SourceError(f"unsupported database {description}")


def _connect_sqlite(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise SourceError(f"no SQLite database at {path}; check --from")
    # Read-only: the import must never change GPT-Load's own file.
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def _connect_mysql(config: dict[str, Any]) -> Any:
    import MySQLdb

    options = config.get("OPTIONS", {})
    arguments: dict[str, Any] = {
        "user": config.get("USER") or "",
        "password": config.get("PASSWORD") or "",
        "database": config["NAME"],
        "charset": options.get("charset", "utf8mb4"),
        "connect_timeout": 5,
    }
    if options.get("unix_socket"):
        arguments["unix_socket"] = options["unix_socket"]
    else:
        arguments["host"] = config.get("HOST") or "127.0.0.1"
        arguments["port"] = int(config.get("PORT") or 3306)
    connection = MySQLdb.connect(**arguments)
    connection.cursor().execute("SET time_zone = '+00:00'")
    return connection


def _connect_postgres(config: dict[str, Any]) -> Any:
    import psycopg

    options = config.get("OPTIONS", {})
    return psycopg.connect(
        host=config.get("HOST") or "localhost",
        port=int(config.get("PORT") or 5432),
        user=config.get("USER") or None,
        password=config.get("PASSWORD") or None,
        dbname=config["NAME"],
        connect_timeout=5,
        sslmode=options.get("sslmode", "prefer"),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# Column values, the same whichever database they came from ------------------------------


def json_value(raw: Any, default: Any) -> Any:
    """A JSON column (text, bytes or already decoded); `default` for NULL, empty or
    `null`. Raises `SourceError` for text that is not JSON."""
    if raw is None:
        return default
    if isinstance(raw, bytes | bytearray | memoryview):
        raw = bytes(raw).decode()
    if isinstance(raw, str):
        if not raw.strip():
            return default
        try:
            raw = json.loads(raw)
        except ValueError:
            raise SourceError(f"a JSON column holds text that is not JSON: {raw[:40]!r}") from None
    return default if raw is None else raw


def bool_value(raw: Any) -> bool:
    if isinstance(raw, str):
        return raw.strip().lower() in ("1", "true", "t", "yes")
    if isinstance(raw, bytes):
        return raw not in (b"", b"\x00", b"0")
    return bool(raw)


def int_value(raw: Any, default: int = 0) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return default


def text_value(raw: Any) -> str:
    if raw is None:
        return ""
    if isinstance(raw, bytes | bytearray | memoryview):
        return bytes(raw).decode(errors="replace")
    return str(raw)


def time_value(raw: Any) -> datetime | None:
    """An aware UTC datetime from a time column: a datetime (naive ones are UTC, as GPT-Load
    writes them to MySQL), text with or without an offset, or Unix seconds."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, datetime):
        return raw.replace(tzinfo=UTC) if raw.tzinfo is None else raw.astimezone(UTC)
    if isinstance(raw, int | float):
        return datetime.fromtimestamp(raw, UTC)
    text = text_value(raw).strip()
    match = TIME_TEXT.match(text)
    if not match:
        raise SourceError(f"a time column holds {text[:40]!r}, which is not a time")
    day, clock, fraction, offset = match.groups()
    micro = (fraction or "").ljust(6, "0")[:6]
    zone = "+00:00" if offset in (None, "Z") else offset
    if len(zone) == 5:  # +0800
        zone = f"{zone[:3]}:{zone[3:]}"
    return datetime.fromisoformat(f"{day}T{clock}.{micro}{zone}").astimezone(UTC)
