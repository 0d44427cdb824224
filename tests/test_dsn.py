from __future__ import annotations

from pathlib import Path

import pytest

from gptload.lib.dsn import (
    describe_database,
    ensure_sqlite_directory,
    mask_url,
    parse_database,
    parse_redis,
)
from gptload.lib.env import ConfigError

BASE = Path("/srv/gptload")


def test_empty_dsn_is_a_sqlite_file_under_data():
    config = parse_database("", BASE)
    assert config["ENGINE"] == "django.db.backends.sqlite3"
    assert config["NAME"] == "/srv/gptload/data/gptload.db"
    assert config["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    assert "journal_mode=WAL" in config["OPTIONS"]["init_command"]
    assert config["OPTIONS"]["timeout"] > 0


@pytest.mark.parametrize(
    ("dsn", "path"),
    [
        ("sqlite:///data/my.db", "/srv/gptload/data/my.db"),
        ("sqlite:////var/lib/gptload.db", "/var/lib/gptload.db"),
        ("./data/gpt-load.db", "/srv/gptload/data/gpt-load.db"),  # GPT-Load's default form
        ("/var/lib/gpt-load.db", "/var/lib/gpt-load.db"),
    ],
)
def test_sqlite_forms(dsn, path):
    config = parse_database(dsn, BASE)
    assert config["ENGINE"] == "django.db.backends.sqlite3"
    assert Path(config["NAME"]) == Path(path)


def test_mysql_url_form():
    config = parse_database("mysql://gp:p%40ss@db.local:3307/gptload", BASE)
    assert config["ENGINE"] == "django.db.backends.mysql"
    assert (config["USER"], config["PASSWORD"], config["HOST"], config["PORT"], config["NAME"]) == (
        "gp",
        "p@ss",
        "db.local",
        3307,
        "gptload",
    )
    assert config["OPTIONS"]["charset"] == "utf8mb4"
    assert config["TEST"]["CHARSET"] == "utf8mb4"


def test_mariadb_scheme_is_mysql():
    assert parse_database("mariadb://root@h/x", BASE)["ENGINE"] == "django.db.backends.mysql"


def test_gpt_load_go_mysql_form():
    config = parse_database(
        "root:s3cr:et@tcp(mysql:3306)/gpt-load?charset=utf8mb4&parseTime=True&loc=Local", BASE
    )
    assert config["ENGINE"] == "django.db.backends.mysql"
    assert (config["USER"], config["PASSWORD"], config["HOST"], config["PORT"], config["NAME"]) == (
        "root",
        "s3cr:et",
        "mysql",
        3306,
        "gpt-load",
    )
    assert config["OPTIONS"]["charset"] == "utf8mb4"


def test_gpt_load_go_mysql_socket_form():
    config = parse_database("app@unix(/run/mysqld/mysqld.sock)/gp", BASE)
    assert config["OPTIONS"]["unix_socket"] == "/run/mysqld/mysqld.sock"
    assert config["NAME"] == "gp"
    assert config["USER"] == "app"


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_postgres_forms(scheme):
    config = parse_database(f"{scheme}://u:pw@pg:5432/gp?sslmode=disable", BASE)
    assert config["ENGINE"] == "django.db.backends.postgresql"
    assert (config["USER"], config["PASSWORD"], config["HOST"], config["PORT"], config["NAME"]) == (
        "u",
        "pw",
        "pg",
        5432,
        "gp",
    )
    assert config["OPTIONS"]["sslmode"] == "disable"


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("ftp://h/x", "unsupported scheme 'ftp'"),
        ("mysql://root:hunter2@h:99x/db", "bad port in mysql://root:***@h:99x/db"),
        ("mysql://root@h:3306/", "no database name"),
        ("sqlite://", "sqlite:// needs a file path"),
    ],
)
def test_bad_database_dsns_name_the_variable_and_hide_the_password(dsn, message):
    with pytest.raises(ConfigError) as caught:
        parse_database(dsn, BASE)
    assert str(caught.value).startswith("DATABASE_DSN: ")
    assert message in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_redis_forms():
    assert parse_redis("") == ""
    assert parse_redis(" redis://:pw@127.0.0.1:6379/2 ") == "redis://:pw@127.0.0.1:6379/2"
    assert parse_redis("rediss://cache.example:6380/0").startswith("rediss://")
    assert parse_redis("unix:///run/redis.sock").startswith("unix://")


@pytest.mark.parametrize(
    "dsn", ["localhost:6379", "http://h:6379", "redis://:pw@h:port/0", "redis:///0"]
)
def test_bad_redis_dsns(dsn):
    with pytest.raises(ConfigError, match=r"^REDIS_DSN: "):
        parse_redis(dsn)


def test_mask_and_describe_never_show_passwords():
    assert mask_url("redis://:topsecret@h:6379/0") == "redis://:***@h:6379/0"
    description = describe_database(parse_database("mysql://root:topsecret@h:3306/db", BASE))
    assert description == "mysql root@h:3306/db"


def test_sqlite_directory_is_created(tmp_path):
    ensure_sqlite_directory(str(tmp_path / "a" / "b" / "x.db"))
    assert (tmp_path / "a" / "b").is_dir()


def test_an_uncreatable_sqlite_directory_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(
        ConfigError, match=r"^DATABASE_DSN: cannot create the directory .*file/sub for SQLite"
    ):
        ensure_sqlite_directory(str(blocker / "sub" / "x.db"))


@pytest.mark.parametrize(
    ("url", "number"),
    [("redis://127.0.0.1:6379/3", 3), ("redis://:pw@host:6379", 0), ("redis://host/", 0),
     ("unix:///run/redis.sock?db=5", 5), ("rediss://host:6380/12", 12)],
)  # fmt: skip
def test_the_redis_database_number_names_the_pubsub_channels(url, number):
    from gptload.lib.dsn import redis_database

    assert redis_database(url) == number
