"""The documentation names every environment variable the settings read, and no other.

`gptload/settings.py` reads each variable once, through the typed readers of
`gptload.lib.env` (`env.string("PORT", …)`, `env.integer(…)`, …). The README's
configuration table and `docker/.env.example` both promise to list every one of them;
this keeps the three in step when a variable is added, renamed or dropped.
"""

from __future__ import annotations

import ast
import re

from conftest import ROOT

SETTINGS = ROOT / "gptload" / "settings.py"
README = ROOT / "README.md"
ENV_EXAMPLE = ROOT / "docker" / ".env.example"
ENV_READERS = frozenset({"string", "integer", "boolean", "items", "choice", "timezone", "raw"})
TABLE_HEADER = re.compile(r"^\|\s*variable\s*\|\s*default\s*\|\s*meaning\s*\|\s*$")
TABLE_NAME = re.compile(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|")
# `NAME=value`, or a commented-out `# NAME=value` (one space at most after the `#`, so
# that examples inside comments, such as `#   DATABASE_DSN=…`, do not count).
ASSIGNMENT = re.compile(r"^(?:#\s?)?([A-Z][A-Z0-9_]*)=")


def first_string(call: ast.Call) -> str | None:
    if call.args and isinstance(call.args[0], ast.Constant):
        value = call.args[0].value
        return value if isinstance(value, str) else None
    return None


def is_os_environ(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "environ"
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    )


def settings_variables() -> set[str]:
    """Names read by `env.<reader>("NAME", …)`, `os.environ[…]`, `os.environ.get(…)` and
    `os.getenv(…)` in gptload/settings.py."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(SETTINGS.read_text(), str(SETTINGS))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner, method = node.func.value, node.func.attr
            reads = (
                (isinstance(owner, ast.Name) and owner.id == "env" and method in ENV_READERS)
                or (is_os_environ(owner) and method in ("get", "pop", "setdefault"))
                or (isinstance(owner, ast.Name) and owner.id == "os" and method == "getenv")
            )
            if reads and (name := first_string(node)):
                names.add(name)
        elif (
            isinstance(node, ast.Subscript)
            and is_os_environ(node.value)
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            names.add(node.slice.value)
    return names


def readme_variables() -> set[str]:
    """The backticked names in the first column of the README's configuration table."""
    lines = README.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if TABLE_HEADER.match(line)]
    assert len(starts) == 1, (
        "README.md should have one configuration table headed '| variable | default | "
        f"meaning |'; found {len(starts)}"
    )
    names: set[str] = set()
    for line in lines[starts[0] + 2 :]:  # after the header and its |---| line
        if not line.startswith("|"):
            break
        match = TABLE_NAME.match(line)
        assert match, f"README.md configuration table: no `NAME` in the first column of {line!r}"
        names.add(match[1])
    return names


def env_example_variables() -> set[str]:
    """The names assigned in docker/.env.example, commented-out assignments included."""
    return {
        match[1]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if (match := ASSIGNMENT.match(line.strip()))
    }


def test_readme_and_env_example_list_every_settings_variable():
    sources = {
        "gptload/settings.py": settings_variables(),
        "the README's configuration table": readme_variables(),
        "docker/.env.example": env_example_variables(),
    }
    assert len(sources["gptload/settings.py"]) >= 20, "the settings' env reads were not found"
    every = set().union(*sources.values())
    problems = [
        f"{', '.join(sorted(every - names))} missing from {where}"
        for where, names in sources.items()
        if every - names
    ]
    assert not problems, "; ".join(problems)
