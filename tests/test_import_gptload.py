"""`manage.py import_gptload`: a GPT-Load 1.4.9 database (SQLite always; MariaDB on the
MariaDB pass) becomes the same groups, members, keys, settings and logs here."""

from __future__ import annotations

import io
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.core.management.base import CommandError

from conftest import ON_MYSQL
from gptload.lib.crypto import Cipher
from keys.models import APIKey, Group, GroupSubGroup, KeyStatus
from logs.models import HourlyStat, RequestLog
from settings_app.models import ConfigVersion, SystemSetting
from tests.gptload_schema import GPTLOAD_AUTH_KEY, HOUR, KEYS, LOG_IDS, Key, World

pytestmark = pytest.mark.django_db
THEIRS = "gpt-load-encryption-key-0123456789"  # GPT-Load's ENCRYPTION_KEY
OURS = "our-own-encryption-key-9876543210"
CHANGED = {
    "max_retries": "5",
    "request_log_retention_days": "30",
    "app_url": "https://gw.example.com",
}
STORES = ["sqlite", pytest.param("mariadb", marks=pytest.mark.skipif(
    not ON_MYSQL, reason="MariaDB runs on the MariaDB pass"))]  # fmt: skip

Source = Callable[..., str]  # builds a GPT-Load database, returns its DSN


@pytest.fixture(params=STORES)
def gptload(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Source]:
    """Builds GPT-Load databases on one store; returns a maker of their DSNs."""
    made: list[str] = []

    def make(cipher: Cipher | None = None, *, extra_keys: int = 0) -> str:
        connection: Any
        if request.param == "sqlite":
            path = tmp_path / f"gpt-load-{len(made)}.db"
            connection, dsn = sqlite3.connect(path), str(path)
        else:
            connection, dsn = _mariadb_database(made)
        dialect = "sqlite" if request.param == "sqlite" else "mysql"
        world = World(connection, dialect, cipher or Cipher(THEIRS))
        world.create_tables()
        world.fill(settings=CHANGED)
        for n in range(extra_keys):
            world.add_key(Key(3, f"sk-bulk-{n:06d}-abcdefghijklmnop"))
        connection.commit()
        connection.close()
        return dsn

    yield make
    if made:
        _drop(made)


def _mariadb_database(made: list[str]) -> tuple[object, str]:
    import MySQLdb

    db = django_settings.DATABASES["default"]
    name = f"gptload_imp_src_{uuid.uuid4().hex[:10]}"
    host, port = db["HOST"] or "127.0.0.1", int(db["PORT"] or 3306)
    admin = MySQLdb.connect(host=host, port=port, user=db["USER"], passwd=db["PASSWORD"])
    admin.cursor().execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    admin.close()
    made.append(name)
    connection = MySQLdb.connect(host=host, port=port, user=db["USER"], passwd=db["PASSWORD"],
                                 database=name, charset="utf8mb4")  # fmt: skip
    password = f":{db['PASSWORD']}" if db["PASSWORD"] else ""
    # GPT-Load's own DSN form, as its .env holds it.
    return (
        connection,
        f"{db['USER']}{password}@tcp({host}:{port})/{name}?charset=utf8mb4&parseTime=True&loc=Asia%2FShanghai",
    )


def _drop(names: list[str]) -> None:
    import MySQLdb

    db = django_settings.DATABASES["default"]
    admin = MySQLdb.connect(host=db["HOST"] or "127.0.0.1", port=int(db["PORT"] or 3306),
                            user=db["USER"], passwd=db["PASSWORD"])  # fmt: skip
    for name in names:
        admin.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
    admin.close()


@pytest.fixture(autouse=True)
def our_encryption_key(settings: object) -> None:
    settings.ENCRYPTION_KEY = OURS  # type: ignore[attr-defined]


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("import_gptload", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def refused(*args: str) -> str:
    with pytest.raises(CommandError) as caught:
        run(*args)
    assert caught.value.returncode == 1
    message = str(caught.value)
    assert "\n" not in message
    return message


def nothing_written() -> None:
    assert not Group.objects.exists()
    assert not APIKey.objects.exists()
    assert not RequestLog.objects.exists()
    assert list(SystemSetting.objects.values_list("setting_key", flat=True)) in ([], ["proxy_keys"])


def secrets_of(name: str) -> dict[str, APIKey]:
    cipher = Cipher(OURS)
    return {cipher.decrypt(k.key_value): k for k in APIKey.objects.filter(group__name=name)}


def test_it_brings_over_groups_members_keys_and_settings(
    gptload, django_capture_on_commit_callbacks
):
    dsn = gptload()
    version = ConfigVersion.current()

    with django_capture_on_commit_callbacks(execute=True):
        out = run("--from", dsn, "--encryption-key", THEIRS)

    main = Group.objects.get(name="openai-main")
    assert (main.display_name, main.description, main.channel_type, main.sort) == (
        "OpenAI main", "gpt-4.1, gpt-4o", "openai", 2)  # fmt: skip
    assert main.upstreams == [{"url": "https://api.openai.com", "weight": 3},
                              {"url": "https://backup.example.com/v1", "weight": 0}]  # fmt: skip
    assert main.config == {"max_retries": 5, "request_timeout": 120}
    assert main.header_rules == [{"key": "X-Team", "value": "${GROUP_NAME}", "action": "set"}]
    assert main.model_redirect_rules == {"gpt-4o": "gpt-4.1"}
    assert main.model_redirect_strict
    assert main.param_overrides == {"temperature": 0.2}
    assert main.proxy_key_list == ["sk-group-main-1", "sk-group-main-2"]
    assert main.last_validated_at == HOUR - timedelta(minutes=5)
    gemini = Group.objects.get(name="gemini-pool")
    assert (gemini.config, gemini.header_rules, gemini.model_redirect_rules) == ({}, [], {})
    aggregate = Group.objects.get(name="openai-all")
    assert aggregate.is_aggregate
    assert aggregate.proxy_keys == "sk-aggregate-proxy"
    members = GroupSubGroup.objects.filter(group=aggregate).values_list("sub_group__name", "weight")
    assert sorted(members) == [("openai-backup", 0), ("openai-main", 10)]

    keys = secrets_of("openai-main")
    assert sorted(keys) == sorted(k.secret for k in KEYS if k.group_id == 1)
    lapsed = keys["sk-main-cccccccccccccccccccc"]
    assert (lapsed.status, lapsed.notes, lapsed.request_count, lapsed.failure_count) == (
        KeyStatus.INVALID, "billing lapsed", 3, 7)  # fmt: skip
    busy = keys["sk-main-aaaaaaaaaaaaaaaaaaaa"]
    assert (busy.status, busy.request_count, busy.last_used_at) == (KeyStatus.ACTIVE, 120, HOUR)
    assert busy.key_hash == Cipher(OURS).hash(busy.secret)  # ours, not GPT-Load's
    assert "sk-main-aaaaaaaaaaaaaaaaaaaa" in secrets_of("openai-backup")
    assert len(secrets_of("gemini-pool")) == 2

    stored = dict(SystemSetting.objects.values_list("setting_key", "setting_value"))
    assert stored["max_retries"] == "5"
    assert stored["request_log_retention_days"] == "30"
    assert stored["app_url"] == "https://gw.example.com"
    assert "failover_status_codes" not in stored  # left at GPT-Load's default: ours applies
    assert GPTLOAD_AUTH_KEY in stored["proxy_keys"].split(",")  # GPT-Load's clients still work
    assert not RequestLog.objects.exists()  # not without --with-logs

    assert "groups: 4 created, 0 updated, 0 unchanged" in out
    assert "aggregate members: 2 added, 0 updated, 0 unchanged, 1 of deleted groups skipped" in out
    assert "keys: 6 keys added, 0 here already" in out
    assert (
        "settings: 4 imported (app_url, max_retries, proxy_keys, request_log_retention_days)" in out
    )
    assert not any(k.secret in out for k in KEYS)
    assert THEIRS not in out
    assert ConfigVersion.current() > version


def test_a_second_run_changes_nothing(gptload, django_capture_on_commit_callbacks):
    dsn = gptload()
    run("--from", dsn, "--encryption-key", THEIRS, "--with-logs")
    rows = sorted(APIKey.objects.values_list("id", "key_hash", "status", "updated_at"))
    version = ConfigVersion.current()

    with django_capture_on_commit_callbacks(execute=True):
        out = run("--from", dsn, "--encryption-key", THEIRS, "--with-logs")

    assert "groups: 0 created, 0 updated, 4 unchanged" in out
    assert "aggregate members: 0 added, 0 updated, 2 unchanged" in out
    assert "keys: 0 keys added, 6 here already" in out
    assert "settings: 0 imported, 4 unchanged" in out
    assert "request logs: 0 added, 4 here already" in out
    assert "hourly statistics: 0 added, 2 here already" in out
    assert sorted(APIKey.objects.values_list("id", "key_hash", "status", "updated_at")) == rows
    assert ConfigVersion.current() == version


def test_it_imports_request_logs_and_hourly_statistics(gptload):
    dsn = gptload()

    out = run("--from", dsn, "--encryption-key", THEIRS, "--with-logs")

    ids = {g.name: g.pk for g in Group.objects.all()}
    logs = {str(log.id): log for log in RequestLog.objects.all()}
    assert sorted(logs) == sorted(LOG_IDS)
    first, retry, via_aggregate, orphan = (logs[i] for i in LOG_IDS)
    assert (first.group_id, first.parent_group_id, first.timestamp) == (
        ids["openai-main"],
        None,
        HOUR,
    )
    assert (retry.request_type, retry.status_code, retry.is_success) == ("retry", 429, False)
    assert (via_aggregate.group_id, via_aggregate.parent_group_id) == (
        ids["openai-backup"], ids["openai-all"])  # fmt: skip
    assert via_aggregate.is_stream
    assert via_aggregate.parent_group_name == "openai-all"
    assert (orphan.group_id, orphan.group_name) == (None, "deleted-group")
    assert Cipher(OURS).decrypt(first.key_value) == KEYS[0].secret
    assert first.key_hash == Cipher(OURS).hash(KEYS[0].secret)
    hourly = sorted(
        HourlyStat.objects.values_list("time", "group_id", "success_count", "failure_count")
    )
    assert hourly == sorted([(HOUR, ids["openai-main"], 40, 2), (HOUR, ids["openai-all"], 12, 1)])
    assert "request logs: 4 added, 0 here already" in out
    assert "hourly statistics: 2 added, 0 here already, 1 of deleted groups skipped" in out


def test_a_dry_run_reports_and_writes_nothing(gptload, django_capture_on_commit_callbacks):
    dsn = gptload()
    version = ConfigVersion.current()

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        out = run("--from", dsn, "--encryption-key", THEIRS, "--with-logs", "--dry-run")

    nothing_written()
    assert not HourlyStat.objects.exists()
    assert not GroupSubGroup.objects.exists()
    assert ConfigVersion.current() == version
    assert not callbacks
    assert "groups: 4 would be created" in out
    assert "aggregate members: 2 would be added" in out
    assert "keys: 6 keys would be added" in out
    assert "request logs: 4 would be added" in out
    assert "Dry run: nothing was written." in out


def test_a_wrong_encryption_key_is_refused_before_anything_is_written(gptload):
    dsn = gptload()

    message = refused("--from", dsn, "--encryption-key", "not-gpt-loads-key-0000000000")

    assert "6 of 6 GPT-Load keys" in message
    assert "it is not GPT-Load's" in message
    assert message.endswith("Nothing was imported.")
    assert "not-gpt-loads-key" not in message
    nothing_written()


def test_encrypted_keys_without_the_key_are_refused(gptload, monkeypatch):
    monkeypatch.delenv("GPTLOAD_ENCRYPTION_KEY", raising=False)
    dsn = gptload()

    message = refused("--from", dsn)

    assert "are encrypted: give GPT-Load's ENCRYPTION_KEY with --encryption-key" in message
    nothing_written()


def test_the_key_may_come_from_the_environment(gptload, monkeypatch):
    dsn = gptload()
    monkeypatch.setenv("GPTLOAD_ENCRYPTION_KEY", THEIRS)

    out = run("--from", dsn)

    assert "keys: 6 keys added" in out


def test_plaintext_keys_import_without_a_key_and_are_encrypted_here(gptload, monkeypatch):
    monkeypatch.delenv("GPTLOAD_ENCRYPTION_KEY", raising=False)
    dsn = gptload(Cipher(""))

    message = refused("--from", dsn, "--encryption-key", THEIRS)
    assert "are stored in plaintext: GPT-Load had no ENCRYPTION_KEY" in message

    run("--from", dsn)

    assert len(secrets_of("openai-main")) == 3
    assert not APIKey.objects.filter(key_value__startswith="sk-").exists()


def test_it_reads_keys_in_batches(gptload):
    dsn = gptload(extra_keys=2100)

    out = run("--from", dsn, "--encryption-key", THEIRS)

    assert "keys: 2,106 keys added" in out
    assert APIKey.objects.filter(group__name="openai-backup").count() == 2101


def test_a_group_our_rules_refuse_stops_the_import(gptload, tmp_path):
    dsn = gptload()
    if not dsn.endswith(".db"):
        pytest.skip("one store is enough for a validation refusal")
    with sqlite3.connect(dsn) as connection:
        connection.execute(
            'UPDATE `groups` SET upstreams = \'[{"url": "ftp://x", "weight": 1}]\' WHERE id = 3'
        )

    message = refused("--from", dsn, "--encryption-key", THEIRS)

    assert "group 'openai-backup': upstreams:" in message
    assert "ftp://x" in message
    nothing_written()


def test_what_is_not_a_gptload_database_is_refused(tmp_path):
    assert "no SQLite database at" in refused("--from", str(tmp_path / "missing.db"))
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (id integer)").connection.commit()
    assert "is not a GPT-Load 1.x database (no table groups, api_keys)" in refused(
        "--from", str(other)
    )


def test_times_keep_their_instant_across_drivers():
    from gptload.lib.gptload_db import time_value

    expected = datetime(2026, 7, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert time_value("2026-07-01 20:00:00.123456789+08:00") == expected
    assert time_value("2026-07-01T12:00:00.123456Z") == expected
    assert time_value("2026-07-01 12:00:00.123456 +0000 UTC") == expected
    assert time_value(datetime(2026, 7, 1, 12, 0, 0, 123456)) == expected


def test_mysql_times_are_read_in_the_dsn_location():
    from gptload.lib.gptload_db import _zone_of

    assert str(_zone_of("u:p@tcp(h:3306)/db?parseTime=True", "Europe/Paris")) == "UTC"
    assert str(_zone_of("u:p@tcp(h:3306)/db?loc=Local", "Asia/Shanghai")) == "Asia/Shanghai"
    assert str(_zone_of("u:p@tcp(h:3306)/db?loc=Europe%2FParis", "UTC")) == "Europe/Paris"
