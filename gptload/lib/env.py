"""Typed readers for environment variables.

Every reader names the variable in its error, so that a bad value stops startup with one
line an operator can act on. `ConfigError` is an `ImproperlyConfigured`, which is what
Django expects settings to raise.
"""

from __future__ import annotations

import os
import zoneinfo
from collections.abc import Mapping

from django.core.exceptions import ImproperlyConfigured

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


class ConfigError(ImproperlyConfigured):
    """A static configuration value (environment variable) is unusable."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        self.problem = problem
        super().__init__(f"{name}: {problem}")


class Env:
    """Reads typed values from a mapping (the process environment by default)."""

    def __init__(self, source: Mapping[str, str] | None = None) -> None:
        self.source = os.environ if source is None else source

    def raw(self, name: str, default: str = "") -> str:
        """The value, stripped; a variable set but empty (`TZ=` in an env file) is unset:
        it means the default, as `.env.example` says."""
        return self.source.get(name, "").strip() or default

    def string(self, name: str, default: str = "") -> str:
        return self.raw(name, default)

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.raw(name).lower()
        if value == "":
            return default
        if value in TRUE_WORDS:
            return True
        if value in FALSE_WORDS:
            return False
        raise ConfigError(name, f"expected true/false (or 1/0, yes/no, on/off), got {value!r}")

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = self.raw(name)
        if value == "":
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(name, f"expected a whole number, got {value!r}") from None
        if minimum is not None and number < minimum:
            raise ConfigError(name, f"must be at least {minimum}, got {number}")
        if maximum is not None and number > maximum:
            raise ConfigError(name, f"must be at most {maximum}, got {number}")
        return number

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name).lower() or default
        if value not in choices:
            raise ConfigError(name, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def items(self, name: str, default: str = "") -> list[str]:
        """A comma-separated list; blanks around items and empty items are dropped."""
        return [item.strip() for item in self.raw(name, default).split(",") if item.strip()]

    def timezone(self, name: str, default: str = "UTC") -> str:
        value = self.raw(name) or default
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                name, f"unknown time zone {value!r} (use an IANA name such as Europe/Paris)"
            ) from None
        return value


def load_settings_or_exit() -> None:
    """Loads Django settings; a `ConfigError` ends the process with one line on stderr.

    Entry points (manage.py, the ASGI module, the Celery app) call this first, so that a
    bad environment variable reads as `gptload: configuration error: PORT: …`, exit code 2,
    instead of a traceback.
    """
    import sys

    from django.conf import settings

    try:
        settings.INSTALLED_APPS  # noqa: B018 - importing the settings module runs the checks
    except ConfigError as exc:
        sys.stderr.write(f"gptload: configuration error: {exc}\n")
        sys.exit(2)
