from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class LogsConfig(AppConfig):
    name = "logs"
    verbose_name = "Request logs"

    def ready(self) -> None:
        from django.conf import settings

        from access.admin import KEY_FIGURES
        from keys.admin import GROUP_FIGURES
        from logs.stats import annotate_24h_traffic
        from logs.usage import annotate_usage
        from settings_app.changes import config_committed

        if annotate_24h_traffic not in GROUP_FIGURES:  # the group list's 24 h traffic
            GROUP_FIGURES.append(annotate_24h_traffic)
        if annotate_usage not in KEY_FIGURES:  # each access key's usage today, this month
            KEY_FIGURES.append(annotate_usage)

        if settings.REDIS_DSN:  # dashboards on every node hear of a change at once
            config_committed.connect(announce_change, dispatch_uid="dashboard-refresh")


def announce_change(**kwargs: Any) -> None:
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from logs.consumers import GROUP

    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(GROUP, {"type": "config.changed"})
    except Exception:  # the dashboards still refresh on their own every few seconds
        import logging

        logging.getLogger("gptload").debug("dashboard refresh not announced", exc_info=True)
