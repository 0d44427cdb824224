"""`manage.py auth_key`: prints the AUTH_KEY in force (the admin and management API key);
with `--proxy`, the global proxy keys (what clients send to /proxy/)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = (
        "Print the AUTH_KEY in force: the one set in the environment (or .env), else the one "
        "gptload made at first boot and keeps in data/auth_key. With --proxy, print the global "
        "proxy keys instead (the proxy_keys setting: made at first boot, never the AUTH_KEY)."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--proxy", action="store_true",
                            help="print the global proxy keys, comma-separated")  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["proxy"]:
            self.stdout.write(settings.AUTH_KEY)
            return
        from settings_app.models import SystemSetting

        self.stdout.write(str(SystemSetting.objects.effective()["proxy_keys"]))
