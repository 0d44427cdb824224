"""The console's dashboard (the admin index): the cards, the chart, the top lists and
the warnings, refreshed live over a WebSocket (`logs.consumers`)."""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpRequest

from gptload.lib.crypto import DecryptionError, current_cipher
from gptload.lib.secrets import mask
from keys.models import Group
from logs import dashboard

SPANS = {"24h": 24, "7d": 7 * 24, "30d": 30 * 24}


def dashboard_callback(request: HttpRequest, context: dict[str, Any]) -> dict[str, Any]:
    span = request.GET.get("span", "24h")
    span = span if span in SPANS else "24h"
    group_id = request.GET.get("group", "")
    group = int(group_id) if group_id.isdigit() else None
    chart = dashboard.hourly_chart(SPANS[span], group)
    figures = dashboard.live_figures()
    tops = top_lists(SPANS[span])
    context.update(
        figures=figures, span=span, spans=list(SPANS), group=group, tops=tops,
        groups=list(Group.objects.order_by("name").values_list("pk", "name")),
        chart_json=json.dumps(chart_js(chart)),
        warnings=dashboard.security_warnings() + dashboard.operations_warnings(),
    )  # fmt: skip
    return context


def chart_js(chart: dict[str, Any]) -> dict[str, Any]:
    """The hourly series as the theme's Chart.js bar chart wants them (stacked)."""
    labels = [label[5:16].replace("T", " ") for label in chart["labels"]]
    ok, failed = chart["datasets"]
    return {
        "labels": labels,
        "datasets": [
            {"label": "Successful", "data": ok["data"], "backgroundColor": "#22c55e", "stack": "s"},
            {"label": "Failed", "data": failed["data"], "backgroundColor": "#ef4444", "stack": "s"},
        ],
    }


def top_lists(hours: int) -> dict[str, list[dict[str, Any]]]:
    """Each top list as rows of (label, note, count); keys masked (never shown whole)."""
    tops = dashboard.top_groups_and_models(hours)
    lists = {name: [{"label": r["name"], "note": "", "count": r["failed" if "errors" in name else "total"]}
                    for r in rows] for name, rows in tops.items()}  # fmt: skip
    cipher = current_cipher()
    for name, rows in dashboard.top_keys().items():
        counted = "failure_count" if "errors" in name else "request_count"
        lists[name] = []
        for row in rows:
            try:
                label = mask(cipher.decrypt(row["key_value"]))
            except DecryptionError:
                label = "(cannot decrypt)"
            lists[name].append({"label": label, "note": row["group__name"], "count": row[counted]})
    return lists
