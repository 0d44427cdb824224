"""ASGI lifespan: starts and stops the per-process services.

Apps register a service (an async `start` and `stop`) in their `AppConfig.ready()`.
uvicorn drives this through lifespan events; daphne has no lifespan, so every service
must also start lazily on first use and stop at process exit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("gptload")


@dataclass(frozen=True)
class Service:
    name: str
    start: Callable[[], Awaitable[None]]
    stop: Callable[[], Awaitable[None]]


SERVICES: list[Service] = []


def register(service: Service) -> None:
    if all(existing.name != service.name for existing in SERVICES):
        SERVICES.append(service)


async def start_all() -> None:
    for service in SERVICES:
        await service.start()
        log.debug("started %s", service.name)


async def stop_all() -> None:
    # Stop in reverse order: later services may depend on earlier ones.
    for service in reversed(SERVICES):
        try:
            await service.stop()
        except Exception:
            log.exception("stopping %s failed", service.name)


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await start_all()
            except Exception as exc:
                log.exception("startup failed")
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await stop_all()
            await send({"type": "lifespan.shutdown.complete"})
            return
