"""`DATABASE_DSN` and `REDIS_DSN` in every form GPT-Load accepts, and the URL forms.

Database forms:
- empty: the SQLite file `data/gptload.db` in the project directory;
- `sqlite:///relative/path.db`, `sqlite:////absolute/path.db`, or a bare file path (GPT-Load);
- `mysql://user:pass@host:port/db` (also `mariadb://`), and GPT-Load's Go form
  `user:pass@tcp(host:port)/db?charset=utf8mb4&parseTime=True` or `…@unix(/socket)/db`;
- `postgres://…` / `postgresql://…`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

import dj_database_url

from gptload.lib.env import ConfigError

DATABASE = "DATABASE_DSN"
REDIS = "REDIS_DSN"


def database_tag(db: dict[str, Any]) -> str:
    """A short name of a Django database (host, port, name), for the Redis keys that hold
    its row ids: two installations (or a test run's databases) sharing one Redis never
    mix their counters."""
    where = f"{db.get('HOST') or ''}:{db.get('PORT') or ''}/{db['NAME']}"
    return hashlib.sha256(where.encode()).hexdigest()[:12]


# GPT-Load (Go driver) form: user:password@tcp(host:port)/dbname?param=value
GO_MYSQL = re.compile(
    r"^(?P<user>[^:@/]*)(?::(?P<password>.*))?@(?P<net>tcp|unix)\((?P<addr>[^)]*)\)/(?P<name>[^?]*)(?:\?(?P<query>.*))?$"
)
URL_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
MYSQL_SCHEMES = ("mysql", "mysql2", "mariadb")
POSTGRES_SCHEMES = ("postgres", "postgresql", "pgsql")
REDIS_SCHEMES = ("redis", "rediss", "unix")


def parse_database(dsn: str, base_dir: Path) -> dict[str, Any]:
    """Django `DATABASES["default"]` for a DSN; raises `ConfigError` naming DATABASE_DSN."""
    dsn = dsn.strip()
    if not dsn:
        return sqlite_config(base_dir / "data" / "gptload.db")
    go = GO_MYSQL.match(dsn)
    if go and not URL_SCHEME.match(dsn):
        return mysql_config(_go_mysql_to_url(go))
    if not URL_SCHEME.match(dsn):
        return sqlite_config(_resolve(dsn, base_dir))
    scheme = dsn.split("://", 1)[0].lower()
    if scheme == "sqlite":
        path = dsn.split("://", 1)[1]
        if path in ("", "/"):
            raise ConfigError(
                DATABASE, "sqlite:// needs a file path, e.g. sqlite:///data/gptload.db"
            )
        return sqlite_config(_resolve(path[1:] if path.startswith("/") else path, base_dir))
    if scheme in MYSQL_SCHEMES:
        return mysql_config("mysql" + dsn[len(scheme) :])
    if scheme in POSTGRES_SCHEMES:
        return postgres_config("postgres" + dsn[len(scheme) :])
    raise ConfigError(
        DATABASE,
        f"unsupported scheme {scheme!r}: use sqlite:///path, mysql://user:pass@host:port/db, "
        "postgres://user:pass@host:port/db, a file path, or user:pass@tcp(host:port)/db",
    )


def sqlite_config(path: Path) -> dict[str, Any]:
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(path),
        "OPTIONS": {
            # WAL lets readers (admin, API) run beside the log writer; IMMEDIATE takes the
            # write lock at BEGIN so two writers queue on busy_timeout instead of failing
            # with "database is locked" halfway through a transaction.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-8000;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        },
        # The test database is a file too: Django's default in-memory one shares a cache
        # with table-level locks, which fail where WAL lets a reader and a writer meet.
        # One per process, so that two test runs side by side do not share it.
        "TEST": {"NAME": str(Path(tempfile.gettempdir()) / f"gptload-test-{os.getpid()}.db")},
    }


def mysql_config(url: str) -> dict[str, Any]:
    config = _parse_url(url, "django.db.backends.mysql")
    query = _query(url)
    options: dict[str, Any] = {
        "charset": query.get("charset", "utf8mb4").split(",")[0],
        "connect_timeout": 5,
        "init_command": "SET sql_mode='STRICT_TRANS_TABLES'",
    }
    if "unix_socket" in query:
        options["unix_socket"] = query["unix_socket"]
    config["OPTIONS"] = options
    config["TEST"] = {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"}
    return config


def postgres_config(url: str) -> dict[str, Any]:
    config = _parse_url(url, "django.db.backends.postgresql")
    options: dict[str, Any] = {"connect_timeout": 5}
    if "sslmode" in _query(url):
        options["sslmode"] = _query(url)["sslmode"]
    config["OPTIONS"] = options
    return config


def parse_redis(dsn: str) -> str:
    """The Redis URL, checked; empty means "no Redis" (in-process state)."""
    dsn = dsn.strip()
    if not dsn:
        return ""
    scheme = dsn.split("://", 1)[0].lower() if "://" in dsn else ""
    if scheme not in REDIS_SCHEMES:
        raise ConfigError(
            REDIS, "expected a URL such as redis://:password@host:6379/0 (or rediss://, unix://)"
        )
    parts = urlsplit(dsn)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(REDIS, f"bad port in {mask_url(dsn)}") from None
    if scheme != "unix" and not parts.hostname:
        raise ConfigError(REDIS, f"no host in {mask_url(dsn)}")
    return dsn


def redis_database(dsn: str) -> int:
    """The database number a Redis URL selects (`/3` or `?db=3`; 0 when it names none)."""
    parts = urlsplit(dsn)
    number = parse_qs(parts.query).get("db", [parts.path.strip("/")])[0]
    return int(number) if number.isdigit() else 0


def mask_url(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def describe_database(config: dict[str, Any]) -> str:
    """A one-line, password-free description of a DATABASES entry."""
    engine = str(config["ENGINE"]).rsplit(".", 1)[-1]
    if engine == "sqlite3":
        return f"sqlite {config['NAME']}"
    where = config.get("OPTIONS", {}).get("unix_socket") or (
        f"{config.get('HOST') or 'localhost'}:{config.get('PORT') or 'default port'}"
    )
    return f"{engine} {config.get('USER', '')}@{where}/{config.get('NAME', '')}"


def ensure_sqlite_directory(path: str) -> None:
    """Creates the directory of a SQLite file; raises `ConfigError` when it cannot."""
    directory = Path(path).parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            DATABASE, f"cannot create the directory {directory} for SQLite: {exc.strerror}"
        ) from None
    if not os.access(directory, os.W_OK):
        raise ConfigError(DATABASE, f"the directory {directory} is not writable")


def _resolve(path: str, base_dir: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else base_dir / candidate


def _go_mysql_to_url(match: re.Match[str]) -> str:
    user = quote(match["user"] or "", safe="")
    password = match["password"]
    auth = f"{user}:{quote(password, safe='')}" if password is not None else user
    query = [(k, v) for k, v in parse_qsl(match["query"] or "") if k == "charset"]
    if match["net"] == "unix":
        query.append(("unix_socket", match["addr"]))
        host = "localhost"
    else:
        host = match["addr"] or "127.0.0.1:3306"
    suffix = "?" + "&".join(f"{k}={quote(v, safe='/')}" for k, v in query) if query else ""
    return f"mysql://{auth}@{host}/{match['name']}{suffix}"


def _parse_url(url: str, engine: str) -> dict[str, Any]:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(DATABASE, f"bad port in {mask_url(url)}") from None
    if not parts.path.strip("/"):
        raise ConfigError(DATABASE, f"no database name in {mask_url(url)}")
    config: dict[str, Any] = dict(dj_database_url.parse(url.split("?", 1)[0], engine=engine))
    config["CONN_MAX_AGE"] = 60
    config["CONN_HEALTH_CHECKS"] = True
    return config


def _query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))
