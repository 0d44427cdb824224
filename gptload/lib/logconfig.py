"""The `LOGGING` dict from `LOG_LEVEL`, `LOG_FORMAT`, `LOG_ENABLE_FILE` and `LOG_FILE_PATH`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LEVELS = {
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
}
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def build_logging(level: str, fmt: str, file_path: Path | None) -> dict[str, Any]:
    handlers = ["console"]
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "text": {"format": TEXT_FORMAT},
            "json": {
                "()": "pythonjsonlogger.json.JsonFormatter",
                "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
                "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            },
        },
        # Every handler masks credentials, whoever logs them and at any level (a library's
        # debug line with an upstream URL, an access line with ?key=).
        "filters": {"redact": {"()": "gptload.lib.secrets.Redacting"}},
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": fmt, "filters": ["redact"]},
        },
        "root": {"level": LEVELS[level], "handlers": handlers},
        "loggers": {
            # SQL statements only at debug, as GPT-Load does.
            "django.db.backends": {"level": "DEBUG" if level == "debug" else "INFO"},
            "uvicorn.access": {"level": "WARNING" if level != "debug" else "INFO"},
            # One line per upstream call would cost the hot path and flood the log.
            "httpx": {"level": "WARNING" if level != "debug" else "INFO"},
            # The embedded broker's URL (filesystem://) has no host, as it should: kombu
            # warns about that on every job queued.
            "kombu.connection": {"level": "ERROR" if level != "debug" else "INFO"},
        },
    }
    if file_path is not None:
        # WatchedFileHandler reopens the file after logrotate moves it.
        config["handlers"]["file"] = {
            "class": "logging.handlers.WatchedFileHandler",
            "filename": str(file_path),
            "formatter": fmt,
            "filters": ["redact"],
            "delay": True,
        }
        handlers.append("file")
    return config
