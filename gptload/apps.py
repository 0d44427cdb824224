from __future__ import annotations

from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class AdminConfig(admin_apps.AdminConfig):
    """Django's admin, served by gptload's site (the Unfold theme, AUTH_KEY sign-in)."""

    default = False  # the `gptload` app's own config is GptloadConfig
    default_site = "gptload.console.GptloadAdminSite"


class GptloadConfig(AppConfig):
    default = True
    name = "gptload"
    verbose_name = "gptload"

    def ready(self) -> None:
        from gptload import (
            checks,  # noqa: F401 - registers the system checks
            health,  # noqa: F401 - its uptime counts from process start
        )

        # Celery's current app must be ours in every process (web, commands), or
        # `task.delay()` would publish through Celery's default app to amqp://localhost.
        from gptload.celery import app

        app.set_default()
