"""What the key commands share: finding the group, reading key text, running a job, and a
progress bar drawn on a terminal only (silent when the output is piped or captured)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from django.core.management.base import CommandError, OutputWrapper

from keys import checker, jobs, services
from keys.models import Group, JobKind

BAR_WIDTH = 30
REDRAW_INTERVAL = 0.1


def count(number: int, noun: str) -> str:
    """`1 key`, `2,000 keys`."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def find_group(name: str) -> Group:
    group = Group.objects.filter(name=name).first()
    if group is None:
        raise CommandError(f"unknown group {name!r} (group names are listed in the admin)")
    return group


def read_text(path: str, stdin: TextIO | None) -> str:
    """The text of `path`, or of stdin for `-` (refused when stdin is a terminal)."""
    if path == "-":
        stream = stdin or sys.stdin
        if stream.isatty():
            raise CommandError(
                "give a FILE of keys, or pipe them in: … | manage.py <command> GROUP -"
            )
        return stream.read()
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CommandError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise CommandError(f"{path}: {exc.strerror or exc}") from None


def parse(text: str) -> list[str]:
    try:
        return services.parse_keys(text)
    except services.KeyOperationError as exc:
        raise CommandError(str(exc)) from None


def run_job(
    group: Group,
    kind: JobKind,
    *,
    keys: Sequence[str] = (),
    params: dict[str, Any] | None = None,
    bar: ProgressBar | None = None,
) -> dict[str, Any]:
    """Runs a key job in this process (the API shows it like a worker's); refusals become
    `CommandError`."""
    try:
        return jobs.run_here(group, kind, keys=keys, params=params, echo=bar)
    except (jobs.JobInProgress, services.KeyOperationError, checker.CheckError) as exc:
        raise CommandError(str(exc)) from None


class ProgressBar:
    """`label [#####-----]  512/1,000  51%` redrawn in place on a terminal; nothing at all
    when `stream` is not one. Use as a context manager, and as a progress callback."""

    def __init__(self, stream: OutputWrapper, label: str) -> None:
        self.stream, self.label = stream, label
        self.enabled = stream.isatty()
        self._drawn_at = 0.0
        self._drawn = False

    def __call__(self, processed: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._drawn_at < REDRAW_INTERVAL and processed < total):
            return
        self._drawn_at, self._drawn = now, True
        share = processed / total if total else 0.0
        filled = round(share * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        line = f"\r{self.label} [{bar}] {processed:,}/{total:,} {share:4.0%}"
        self.stream.write(line, style_func=_plain, ending="")
        self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._drawn:
            self.stream.write("", style_func=_plain, ending="\n")
            self.stream.flush()


def _plain(text: str) -> str:
    return text  # stderr is styled as errors by default; a progress bar is not one
