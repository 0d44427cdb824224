"""`manage.py auth_key`: prints the AUTH_KEY in force (the admin and management API key)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Print the AUTH_KEY in force: the one set in the environment (or .env), else the one "
        "gptload made at first boot and keeps in data/auth_key."
    )
    requires_system_checks: list[str] = []

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(settings.AUTH_KEY)
