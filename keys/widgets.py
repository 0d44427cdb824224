"""Form widgets for a group's structured fields: JSON edited as rows, proxy keys with a
generator. The browser side is Alpine.js, which the console's theme already loads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from django import forms
from unfold.widgets import BASE_INPUT_CLASSES, BUTTON_CLASSES, SELECT_CLASSES

Column = tuple[str, Any, Any]  # name, label, "text" | "url" | "number" | a list of choices


class JsonRowsWidget(forms.Widget):
    """A JSON list of objects, or a JSON object (`mapping=(key column, value column)`),
    edited as a table of rows: add, change, remove. Posts the JSON back as text."""

    template_name = "gptload/widgets/json_rows.html"

    def __init__(self, columns: Sequence[Column], new_row: dict[str, Any] | None = None,
                 mapping: tuple[str, str] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.columns, self.mapping = list(columns), mapping
        self.new_row = new_row or {name: "" for name, _, _ in columns}

    def rows(self, value: Any) -> list[dict[str, Any]]:
        if isinstance(value, str):
            try:
                value = json.loads(value or "null")
            except ValueError:
                return []
        if self.mapping and isinstance(value, dict):
            key, val = self.mapping
            return [
                {key: k, val: v if isinstance(v, str) else json.dumps(v)} for k, v in value.items()
            ]
        return [row for row in value or [] if isinstance(row, dict)]

    def get_context(self, name: str, value: Any, attrs: dict[str, Any] | None) -> dict[str, Any]:
        context = super().get_context(name, value, attrs)
        context["widget"].update(
            rows_json=json.dumps(self.rows(value)),
            new_row_json=json.dumps(self.new_row),
            columns=[{"name": n, "label": label, "kind": kind if isinstance(kind, str) else "choice",
                      "choices": [] if isinstance(kind, str) else list(kind)}
                     for n, label, kind in self.columns],
            input_classes=" ".join(BASE_INPUT_CLASSES), select_classes=" ".join(SELECT_CLASSES),
            button_classes=" ".join(BUTTON_CLASSES),
        )  # fmt: skip
        return context

    def value_from_datadict(self, data: Any, files: Any, name: str) -> str:
        try:
            rows = json.loads(data.get(name) or "[]")
        except ValueError:
            return str(data.get(name))  # the form field reports it
        if self.mapping and isinstance(rows, dict):  # already the object (scripts, tests)
            return json.dumps(rows)
        numeric = {n for n, _, kind in self.columns if kind == "number"}
        cleaned = []
        for row in rows if isinstance(rows, list) else []:
            if not isinstance(row, dict) or not any(str(v).strip() for v in row.values()):
                continue  # an empty row added and left
            cleaned.append({k: as_number(v) if k in numeric else v for k, v in row.items()})
        if self.mapping:
            key, val = self.mapping
            return json.dumps({str(r.get(key, "")).strip(): r.get(val, "") for r in cleaned})
        return json.dumps(cleaned)


def as_number(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


class ProxyKeysWidget(forms.Textarea):
    """The group's own proxy keys (comma separated), with a button that adds a strong one."""

    template_name = "gptload/widgets/proxy_keys.html"

    def __init__(self) -> None:
        super().__init__(attrs={"rows": 2, "class": " ".join(BASE_INPUT_CLASSES),
                                "placeholder": "sk-…, sk-…", "spellcheck": "false"})  # fmt: skip

    def get_context(self, name: str, value: Any, attrs: dict[str, Any] | None) -> dict[str, Any]:
        context = super().get_context(name, value, attrs)
        context["widget"]["button_classes"] = " ".join(BUTTON_CLASSES)
        return context
