"""The fault suite's counts, added up over the run and printed in pytest's summary.

A fault test takes the `tally` fixture and counts, as it goes, the proxied requests it
sent, the errors its clients saw while the group still had a healthy key, the errors it
saw after bytes of the answer had reached the client (a cut stream: nothing can be
tried again then), and the log rows that never appeared. The counts ride on the test's
report (`user_properties`), so that under pytest-xdist they reach the controlling
process, which adds them up per test module and prints them at the end of the run.

Loaded as a plugin by the root `conftest.py`, so that its hooks run in the controlling
process too (which never collects `tests/faults/` itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import pytest

PROPERTY = "fault-tally"
TITLES = {
    "test_upstream_faults": "upstream faults, through the SDKs",
    "test_vanishing_clients": "clients that vanish",
    "test_store_restarts": "Redis and the database stopped and restarted",
    "test_sigterm": "SIGTERM with 50 streams in flight",
}


@dataclass
class Tally:
    """What one test counted; see the module's docstring."""

    requests: int = 0
    errors_with_healthy_key: int = 0
    cut_mid_answer: int = 0
    rows_expected: int = 0
    rows_lost: int = 0

    def add(self, other: Tally) -> None:
        for name in self.names():
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @staticmethod
    def names() -> list[str]:
        return [f.name for f in fields(Tally)]


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    counts = Tally()
    # A mutable record: the call phase's report carries its values as the test left them.
    record: dict[str, int] = {}
    request.node.user_properties.append((PROPERTY, record))
    yield counts
    record.update({name: getattr(counts, name) for name in Tally.names()})


TOTALS: dict[str, Tally] = {}  # by test module, in the process that prints the summary


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # The teardown report is the one made after the fixture wrote its counts.
    if report.when != "teardown":
        return
    for name, value in report.user_properties:
        if name == PROPERTY and isinstance(value, dict) and value:
            module = report.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
            TOTALS.setdefault(module, Tally()).add(Tally(**value))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    totals = TOTALS
    if not totals or hasattr(terminalreporter.config, "workerinput"):
        return
    terminalreporter.section("faults survived")
    width = max(len(TITLES.get(m, m)) for m in totals)
    terminalreporter.line(
        f"{'':{width}}  requests  errors with a healthy key  cut mid-answer  log rows lost"
    )
    whole = Tally()
    for module in sorted(totals, key=lambda m: list(TITLES).index(m) if m in TITLES else 99):
        counts = totals[module]
        whole.add(counts)
        terminalreporter.line(line(TITLES.get(module, module), counts, width))
    terminalreporter.line(line("all", whole, width))


def line(title: str, counts: Tally, width: int) -> str:
    return (
        f"{title:{width}}  {counts.requests:8d}  {counts.errors_with_healthy_key:24d}"
        f"  {counts.cut_mid_answer:14d}  {counts.rows_lost:13d} of {counts.rows_expected}"
    )
