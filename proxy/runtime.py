"""Per-process proxy state: the snapshot, the upstream client, and the key-state writer.

Started lazily by the first proxied request (daphne has no lifespan) and stopped by the
ASGI lifespan. A background task checks the configuration version once a second, writes
pending key-state changes in one batch, and swaps in a fresh snapshot when needed.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, transaction

from gptload.lib.upstream import upstream_client
from gptload.lifespan import Service, register
from keys.models import APIKey, KeyStatus
from proxy.recorder import recorder
from proxy.shared import KeyState, Shared
from proxy.snapshot import KeyEntry, Snapshot, build_snapshot
from settings_app.models import ConfigVersion

log = logging.getLogger("gptload.proxy")
POLL_SECONDS = 1.0


class Runtime:
    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.pending: dict[int, KeyEntry] = {}
        self.pending_errors: dict[int, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None
        self.clients: dict[tuple[str, int, int, int], httpx.AsyncClient] = {}
        self.shared: Shared | None = None
        self._generation = 0

    async def current(self) -> Snapshot:
        if self.snapshot is not None:
            return self.snapshot
        if self._ready is None:
            self._ready = ready = asyncio.Event()
            try:
                await self._refresh(force=True)
            finally:
                self._ready = ready if self.snapshot is not None else None
                ready.set()
            if self._task is None:
                self._task = asyncio.create_task(self._watch())
            if settings.REDIS_DSN and self._listener is None:
                self.shared = self.shared or Shared(settings.REDIS_DSN)
                self._listener = asyncio.create_task(
                    self.shared.listen(self._on_config, self.apply_shared)
                )
        waiting = self._ready
        if waiting is not None:
            await waiting.wait()
        if self.snapshot is None:
            raise RuntimeError("the proxy snapshot could not be built")
        return self.snapshot

    def invalidate(self) -> None:
        """Forgets the snapshot; the next request rebuilds it from the database."""
        self.snapshot, self._ready = None, None
        self._generation += 1

    def http(self, config: Mapping[str, Any]) -> httpx.AsyncClient:
        """The upstream client for a group's effective settings, shared by equal ones.

        Connection slots never fall below `MAX_CONCURRENT_REQUESTS`, so that the gateway
        never queues behind its own pool; `max_idle_conns*` can raise them, not lower them.
        """
        fingerprint = (str(config["proxy_url"]), int(config["max_idle_conns"]),
                       int(config["max_idle_conns_per_host"]), int(config["idle_conn_timeout"]))  # fmt: skip
        client = self.clients.get(fingerprint)
        if client is None:
            proxy_url, max_idle, max_idle_per_host, idle_timeout = fingerprint
            floor = settings.MAX_CONCURRENT_REQUESTS
            client = self.clients[fingerprint] = upstream_client(
                proxy_url, limit=max(max_idle, floor), per_host=max(max_idle_per_host, floor),
                idle_timeout=idle_timeout,
            )  # fmt: skip
        return client

    def key_changed(self, key: KeyEntry, error: str = "") -> None:
        key.changed_at = time.time()
        self.pending[key.id] = key
        if error:
            self.pending_errors[key.id] = error
        if self.shared is not None:
            self.shared.publish(KeyState(key.id, key.status, key.cooling_until,
                                         key.consecutive_failures, key.changed_at))  # fmt: skip

    def apply_shared(self, state: KeyState) -> None:
        """Another node changed a key's state: adopt it, unless ours is newer."""
        snapshot = self.snapshot
        key = snapshot.keys_by_id.get(state.id) if snapshot else None
        if snapshot is None or key is None or key.changed_at >= state.at:
            return
        key.adopt(state.status, state.until, state.failures, state.at)
        group = snapshot.groups_by_id.get(key.group_id)
        if group is not None and state.status not in (KeyStatus.ACTIVE, KeyStatus.COOLING):
            group.ring.remove(key)

    async def _on_config(self) -> None:
        try:
            await self._refresh()
        except Exception:
            log.exception("proxy snapshot refresh failed")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                await self.flush_keys()
                await self._refresh()
            except Exception:  # a process edge: log and keep serving the last snapshot
                log.exception("proxy snapshot refresh failed")

    async def _refresh(self, force: bool = False) -> None:
        generation = self._generation
        version = await sync_to_async(_read_version)()
        if force or self.snapshot is None or version != self.snapshot.version:
            snapshot = await sync_to_async(_build)(version, self.snapshot)
            await self._overlay(snapshot)
            if force or generation == self._generation:  # else invalidated while built
                self.snapshot = snapshot

    async def _overlay(self, snapshot: Snapshot) -> None:
        """Key states other nodes shared and the database has not caught up with yet."""
        if not settings.REDIS_DSN:
            return
        self.shared = self.shared or Shared(settings.REDIS_DSN)
        try:
            states = await self.shared.load()
        except Exception as exc:
            log.warning("shared key states unavailable (%s); using the database's", exc)
            return
        previous, self.snapshot = self.snapshot, snapshot
        try:
            for state in states:
                self.apply_shared(state)
        finally:
            self.snapshot = previous

    async def flush_keys(self) -> None:
        if not self.pending:
            return
        batch, errors = self.pending, self.pending_errors
        self.pending, self.pending_errors = {}, {}
        await sync_to_async(write_key_states)(list(batch.values()), errors)

    async def stop(self) -> None:
        for task in (self._task, self._listener):
            if task is not None:
                task.cancel()
        await self.flush_keys()
        await recorder.stop()
        for client in self.clients.values():
            await client.aclose()
        if self.shared is not None:
            await self.shared.close()
        self.clients, self.snapshot, self._ready, self._task = {}, None, None, None
        self._listener, self.shared = None, None


def _read_version() -> int:
    close_old_connections()
    return ConfigVersion.current()


def _build(version: int, previous: Snapshot | None) -> Snapshot:
    return build_snapshot(version, previous)


def write_key_states(keys: list[KeyEntry], errors: dict[int, str]) -> None:
    """Stores key states in one transaction; `update()` leaves the version alone."""
    now = datetime.now(UTC)
    with transaction.atomic():
        for key in keys:
            fields: dict[str, Any] = {
                "status": key.status,
                "consecutive_failures": key.consecutive_failures,
                "cooling_until": datetime.fromtimestamp(key.cooling_until, UTC)
                if key.status == KeyStatus.COOLING
                else None,
                "status_changed_at": now,
            }
            if key.id in errors:
                fields["last_error"] = errors[key.id]
            APIKey.objects.filter(pk=key.id).update(**fields)


runtime = Runtime()


async def _start() -> None:
    """Warms the snapshot; a database that is not ready yet (a slave before the master
    migrated) must not stop the server, so the first proxied request tries again."""
    try:
        await runtime.current()
    except Exception as exc:
        log.warning("proxy snapshot not built at startup (%s); retrying on first request", exc)


register(Service("proxy runtime", _start, runtime.stop))


def _flush_at_exit() -> None:
    """daphne has no lifespan: what the stop above would have written, written at exit.

    Under uvicorn the lifespan already emptied both, and this does nothing.
    """
    if runtime.pending:
        try:
            write_key_states(list(runtime.pending.values()), runtime.pending_errors)
        except Exception:
            log.exception("key states not written at exit")
    recorder.write_now()


atexit.register(_flush_at_exit)


def now() -> float:
    return time.time()
