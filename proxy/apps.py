from __future__ import annotations

from django.apps import AppConfig


class ProxyConfig(AppConfig):
    name = "proxy"
    verbose_name = "Proxy"

    def ready(self) -> None:
        from proxy import runtime  # noqa: F401 - registers the proxy runtime with the lifespan
