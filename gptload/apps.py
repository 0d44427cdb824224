from __future__ import annotations

from django.apps import AppConfig


class GptloadConfig(AppConfig):
    name = "gptload"
    verbose_name = "gptload"

    def ready(self) -> None:
        from gptload import checks  # noqa: F401 - registers the system checks
