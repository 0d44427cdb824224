"""The import contracts of docs/ARCHITECTURE.md stay complete as modules are added.

`make lint` runs import-linter on the contracts in pyproject.toml; the list of the entry
package's modules that the apps may not import is written out there, so this checks it
names every module of `gptload/` outside `gptload/lib/`.
"""

from __future__ import annotations

import tomllib

from conftest import ROOT


def test_every_entry_module_is_forbidden_to_the_apps():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (forbidden,) = [c for c in contracts if c["type"] == "forbidden"]
    entry = {
        f"gptload.{path.stem if path.is_file() else path.name}"
        for path in (ROOT / "gptload").iterdir()
        if path.name not in ("lib", "__init__.py", "__pycache__")
        and (path.suffix == ".py" or (path / "__init__.py").exists())
    }
    assert entry == set(forbidden["forbidden_modules"])
    assert set(forbidden["source_modules"]) == {
        "proxy",
        "logs",
        "access",
        "keys",
        "settings_app",
        "gptload.lib",
    }


def test_the_apps_are_layered_as_the_map_says():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (layers,) = [c for c in contracts if c["type"] == "layers"]
    assert layers["layers"] == ["proxy", "logs", "access", "keys", "settings_app", "gptload.lib"]
    architecture = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert "proxy → logs → access → keys → settings_app → gptload.lib" in architecture
