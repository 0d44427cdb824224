"""The live dashboard: a WebSocket that sends the dashboard's figures every few seconds,
and at once when the configuration changes (through the channel layer, so that every
node's dashboards hear of a change made on any node)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.core.cache import cache
from django.core.serializers.json import DjangoJSONEncoder

from logs import dashboard

log = logging.getLogger("gptload")
GROUP = "dashboard"
EVERY = 3.0  # seconds between updates
CACHE_KEY = "dashboard:live"


def figures() -> dict[str, Any]:
    """Shared by every dashboard open in this process (one computation per interval)."""
    cached = cache.get(CACHE_KEY)
    if cached is None:
        cached = dashboard.live_figures()
        cache.set(CACHE_KEY, cached, EVERY - 0.5)
    return cached


class DashboardConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not (user.is_active and user.is_staff):
            await self.close(code=4401)
            return
        await self.accept()
        if self.channel_layer is not None:
            await self.channel_layer.group_add(GROUP, self.channel_name)
        self.pusher = asyncio.create_task(self.push())

    async def disconnect(self, code: int) -> None:
        pusher = getattr(self, "pusher", None)
        if pusher is not None:
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pusher
        if self.channel_layer is not None:
            await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def push(self) -> None:
        while True:
            try:
                await self.send_json(await database_sync_to_async(figures)())
            except Exception as exc:  # a database away: try again next time
                log.warning("dashboard figures unavailable: %s", exc)
            await asyncio.sleep(EVERY)

    async def config_changed(self, event: dict[str, Any]) -> None:
        cache.delete(CACHE_KEY)
        await self.send_json(await database_sync_to_async(figures)())

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        import json

        return json.dumps(content, cls=DjangoJSONEncoder)
