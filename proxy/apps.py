from __future__ import annotations

from django.apps import AppConfig


class ProxyConfig(AppConfig):
    name = "proxy"
    verbose_name = "Proxy"

    def ready(self) -> None:
        from proxy.runtime import runtime  # registers the proxy runtime with the lifespan
        from settings_app.changes import config_committed

        # A change made in this process is in force here before its own response returns.
        config_committed.connect(runtime.on_committed, dispatch_uid="proxy-catch-up")
