"""The console's dashboard (the admin index): what it shows, read from rollups and
in-memory figures, never by scanning the log table."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest


def dashboard_callback(request: HttpRequest, context: dict[str, Any]) -> dict[str, Any]:
    return context
