"""Cluster mode: configuration changes and key states shared through Redis.

- A configuration change (the `ConfigVersion` bump) is published on `gptload:config`;
  every process rebuilds its snapshot on the message instead of waiting for its poll.
- A key state change (benched, cooling, failure count) is stored in the hash
  `gptload:key-states` and published on `gptload:keys`; every other process applies it
  to its snapshot at once, so a key benched on one node is skipped by all. A snapshot
  built later overlays the hash on what the database says, unless the database has
  seen a newer change (an operator restoring the key, a validation that succeeded).

Without `REDIS_DSN` none of this runs: one node needs no sharing. When Redis goes
away the proxy keeps serving on its local state and reconnects in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from settings_app.models import CONFIG_CHANNEL

log = logging.getLogger("gptload.proxy")
KEYS_CHANNEL = "gptload:keys"
KEY_STATES = "gptload:key-states"
NODE = uuid.uuid4().hex
RECONNECT_SECONDS = 1.0


@dataclass(frozen=True)
class KeyState:
    id: int
    status: str
    until: float
    failures: int
    at: float  # when the change happened (wall clock)

    def encode(self, node: str = NODE) -> bytes:
        return orjson.dumps({"node": node, "id": self.id, "s": self.status, "u": self.until,
                             "f": self.failures, "t": self.at})  # fmt: skip

    @classmethod
    def decode(cls, raw: bytes | str) -> tuple[str, KeyState] | None:
        try:
            data = orjson.loads(raw)
            return str(data.get("node", "")), cls(
                int(data["id"]), str(data["s"]), float(data["u"]), int(data["f"]), float(data["t"])
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


class Shared:
    """This process's link to the other nodes: an async Redis client and a subscriber."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        self._tasks: set[asyncio.Task[Any]] = set()

    def publish(self, state: KeyState) -> None:
        """Stores and announces a key's new state, without making the caller wait."""
        task = asyncio.get_running_loop().create_task(self._publish(state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, state: KeyState) -> None:
        payload = state.encode()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if state.status == "active" and not state.failures:
                    pipe.hdel(KEY_STATES, str(state.id))
                else:
                    pipe.hset(KEY_STATES, str(state.id), payload)
                pipe.publish(KEYS_CHANNEL, payload)
                await pipe.execute()
        except Exception as exc:
            log.warning("could not share key %s's state through Redis: %s", state.id, exc)

    async def load(self) -> list[KeyState]:
        """Every shared key state; cooling states that ran out are dropped from the hash."""
        raw = await self.redis.hgetall(KEY_STATES)
        states, stale = [], []
        now = time.time()
        for field, value in raw.items():
            decoded = KeyState.decode(value)
            if decoded is None:
                stale.append(field)
                continue
            state = decoded[1]
            if state.status == "cooling" and state.until <= now and not state.failures:
                stale.append(field)
                continue
            states.append(state)
        if stale:
            await self.redis.hdel(KEY_STATES, *stale)
        return states

    async def listen(
        self,
        on_config: Callable[[], Awaitable[None]],
        on_key: Callable[[KeyState], None],
    ) -> None:
        """Follows both channels for ever, reconnecting after an outage."""
        warned = False
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(CONFIG_CHANNEL, KEYS_CHANNEL)
                    if warned:
                        log.warning("Redis is back; following configuration and key changes")
                        await on_config()  # whatever was missed meanwhile
                    warned = False
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        await self._dispatch(message, on_config, on_key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not warned:
                    log.warning("Redis unreachable (%s); serving on local state", exc)
                    warned = True
                await asyncio.sleep(RECONNECT_SECONDS)

    async def _dispatch(
        self,
        message: dict[str, Any],
        on_config: Callable[[], Awaitable[None]],
        on_key: Callable[[KeyState], None],
    ) -> None:
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        if channel == CONFIG_CHANNEL:
            await on_config()
            return
        decoded = KeyState.decode(message["data"])
        if decoded is not None and decoded[0] != NODE:
            on_key(decoded[1])

    async def close(self) -> None:
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        await self.redis.aclose()
