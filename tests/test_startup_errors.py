"""A bad environment stops every entry point with one line naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, SQLITE_PASS, base_env, manage

pytestmark = SQLITE_PASS

BAD_VALUES = [
    ("PORT", "abc", "PORT: expected a whole number"),
    ("PORT", "0", "PORT: must be at least 1"),
    (
        "SERVER_GRACEFUL_SHUTDOWN_TIMEOUT",
        "5",
        "SERVER_GRACEFUL_SHUTDOWN_TIMEOUT: must be at least 10",
    ),
    ("SERVER_READ_TIMEOUT", "-1", "SERVER_READ_TIMEOUT: must be at least 1"),
    ("IS_SLAVE", "perhaps", "IS_SLAVE: expected true/false"),
    ("MAX_CONCURRENT_REQUESTS", "many", "MAX_CONCURRENT_REQUESTS: expected a whole number"),
    ("LOG_LEVEL", "loud", "LOG_LEVEL: expected one of"),
    ("LOG_FORMAT", "xml", "LOG_FORMAT: expected one of text, json"),
    ("TZ", "Mars/Olympus", "TZ: unknown time zone"),
    ("DATABASE_DSN", "ftp://h/db", "DATABASE_DSN: unsupported scheme"),
    ("REDIS_DSN", "localhost:6379", "REDIS_DSN: expected a URL"),
    ("ENABLE_CORS", "true", "ALLOWED_ORIGINS: ENABLE_CORS is on but no origin"),
    ("LOG_ENABLE_FILE", "yes-please", "LOG_ENABLE_FILE: expected true/false"),
    ("STATS_RETENTION_DAYS", "-3", "STATS_RETENTION_DAYS: must be at least 0"),
    ("MAX_REQUEST_BODY_MB", "0", "MAX_REQUEST_BODY_MB: must be at least 1"),
    ("HSTS_SECONDS", "a year", "HSTS_SECONDS: expected a whole number"),
]


def assert_one_clear_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gptload: configuration error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("name", "value", "expected"), BAD_VALUES)
def test_manage_py_stops_with_one_line(name, value, expected):
    assert_one_clear_line(manage("check", env=base_env(**{name: value})), expected)


def test_the_asgi_module_stops_with_one_line():
    result = subprocess.run(
        [sys.executable, "-c", "import gptload.asgi"],
        env=base_env(PORT="nope"), cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert_one_clear_line(result, "PORT: expected a whole number")


def test_the_celery_app_stops_with_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "gptload", "inspect", "ping"],
        env=base_env(TZ="Nowhere/Land"), cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "gptload: configuration error: TZ: unknown time zone" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unwritable_sqlite_location_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = manage("check", env=base_env(DATABASE_DSN=str(blocker / "data" / "gptload.db")))
    assert_one_clear_line(result, "DATABASE_DSN: cannot create the directory")


def test_an_unwritable_log_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = manage(
        "check", env=base_env(LOG_ENABLE_FILE="true", LOG_FILE_PATH=str(blocker / "app.log"))
    )
    assert_one_clear_line(result, "LOG_FILE_PATH: cannot write")


def test_a_dotenv_file_in_the_working_directory_is_read(tmp_path):
    (tmp_path / ".env").write_text("PORT=not-a-port\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "check"],
        env=base_env(), cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert_one_clear_line(result, "PORT: expected a whole number, got 'not-a-port'")


def test_the_environment_wins_over_dotenv(tmp_path):
    (tmp_path / ".env").write_text("PORT=not-a-port\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "check", "--deploy", "--fail-level", "CRITICAL"],
        env=base_env(PORT="3005", DATABASE_DSN=str(tmp_path / "x.db")), cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_cors_for_every_origin_is_never_combined_with_credentials():
    env = base_env(ENABLE_CORS="true", ALLOWED_ORIGINS="*", ALLOW_CREDENTIALS="true")
    assert_one_clear_line(manage("check", env=env), "ALLOW_CREDENTIALS: cannot be combined with")
    listed = base_env(
        ENABLE_CORS="true", ALLOWED_ORIGINS="https://a.example", ALLOW_CREDENTIALS="true"
    )
    assert manage("check", env=listed).returncode == 0
