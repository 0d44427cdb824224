"""Per-process proxy state: the snapshot, the upstream sessions, and the background work.

Started lazily by the first proxied request (daphne has no lifespan) and stopped by the
ASGI lifespan. How a configuration change reaches the snapshot:

- made in this process: `settings_app.changes` sends `config_committed` after commit and
  `catch_up()` installs it in the committing thread, before the change's own response
  returns (read-your-writes);
- made elsewhere: a Redis message (cluster mode) or the once-a-second version check
  starts a catch-up in a worker thread;
- a request that finds no group of its name, no matching proxy key or no usable key
  checks the version once before it refuses (`refresh()`), so that a group created by
  another worker a moment ago answers on the next line.

A catch-up reads the change rows above the snapshot's version and rebuilds only what
they name (`proxy.snapshot.apply`). Builds are serialised by a lock; the event loop only
ever reads `runtime.snapshot`, swapped whole.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import logging
import threading
import time
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from gptload.lib.lifespan import Service, register
from gptload.lib.upstream import OutboundProxy, outbound_proxy, upstream_session
from keys.caps import caps
from keys.states import KEYS_CHANNEL, from_other_node, key_states, write_states
from logs import live
from proxy import metrics
from proxy import snapshot as snapshots
from proxy.limits import limits
from proxy.recorder import recorder
from proxy.snapshot import ClientSettings, GroupView, Snapshot
from settings_app.changes import CONFIG_CHANNEL, changes_since
from settings_app.models import ChangeScope

log = logging.getLogger("gptload.proxy")
POLL_SECONDS = 1.0
RECONNECT_SECONDS = 1.0


class Upstream:
    """One pool of upstream connections (per event loop and client settings)."""

    def __init__(self, client: ClientSettings) -> None:
        # Slots never fall below MAX_CONCURRENT_REQUESTS, so the gateway never queues
        # behind its own pool; `max_idle_conns*` can raise them, not lower them.
        floor = settings.MAX_CONCURRENT_REQUESTS
        self.session = upstream_session(
            client.proxy_url, limit=max(client.max_idle, floor),
            per_host=max(client.max_idle_per_host, floor), idle_timeout=client.idle_timeout,
        )  # fmt: skip
        proxy: OutboundProxy = outbound_proxy(client.proxy_url)
        self.proxy, self.proxy_headers = proxy.url, proxy.headers


class Runtime:
    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.upstreams: dict[ClientSettings, Upstream] = {}
        self._lock = threading.Lock()
        self._first: asyncio.Future[Snapshot] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- the snapshot --

    async def current(self) -> Snapshot:
        """The snapshot, built on first use (then the background work starts)."""
        if self.snapshot is not None:
            return self.snapshot
        if self._first is None:
            self._first = asyncio.get_running_loop().create_future()
            try:
                built = await sync_to_async(self._build_first, thread_sensitive=False)()
            except BaseException as exc:
                first, self._first = self._first, None
                first.set_exception(exc)
                first.exception()  # retrieved: a later request tries again
                raise
            self._first.set_result(built)
            self._start_background()
            return built
        return await asyncio.shield(self._first)

    def _build_first(self) -> Snapshot:
        close_old_connections()
        with self._lock:
            if self.snapshot is None:
                version, _ = changes_since(0)
                started = time.perf_counter()
                built = snapshots.build(version)
                metrics.snapshot_build.labels("whole").observe(time.perf_counter() - started)
                self.install(built, whole=True)
            return self.current_or_fail()

    def install(self, snapshot: Snapshot, *, whole: bool = False) -> None:
        self.snapshot = snapshot
        if whole:
            # The keys live until they change: keep the cyclic collector off them, so that
            # a full collection does not walk 100k keys (105 ms pauses, measured). The
            # snapshot holds no reference cycles, so it is still freed when replaced.
            gc.collect()
            gc.freeze()

    def catch_up(self) -> None:
        """Applies every change since the snapshot's version (sync: a worker thread, or the
        thread that committed a change)."""
        if self.snapshot is None:
            return
        with self._lock:
            current = self.snapshot
            if current is None:
                return
            version, changes = changes_since(current.version)
            if version == current.version:
                return
            started = time.perf_counter()
            whole = changes is None or any(s == ChangeScope.ALL for s, _ in changes)
            if changes is None:
                built = snapshots.build(version, current)
            else:
                built = snapshots.apply(current, version, changes)
            metrics.snapshot_build.labels("whole" if changes is None else "changes").observe(
                time.perf_counter() - started
            )
            self.install(built, whole=whole)
        log.debug("snapshot v%d installed in %.1f ms (%s)", version,
                  (time.perf_counter() - started) * 1000, changes or "everything")  # fmt: skip

    async def refresh(self) -> Snapshot:
        """Catches up now (one catch-up at a time; concurrent callers share it)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh())
        await asyncio.shield(self._refreshing)
        return self.current_or_fail()

    def current_or_fail(self) -> Snapshot:
        if self.snapshot is None:
            raise RuntimeError("the proxy snapshot is not built")
        return self.snapshot

    async def _refresh(self) -> None:
        await sync_to_async(self._catch_up_in_thread, thread_sensitive=False)()

    def _catch_up_in_thread(self) -> None:
        close_old_connections()
        self.catch_up()

    def on_committed(self, **kwargs: Any) -> None:
        """`config_committed` receiver: this process made a change; it is in force here
        before the code that made it goes on."""
        try:
            self.catch_up()
        except Exception:  # the version check will try again within a second
            log.exception("proxy snapshot not updated after a local change")

    # -- upstream sessions --

    def upstream(self, group: GroupView) -> Upstream:
        found = self.upstreams.get(group.client)
        if found is None:
            found = self.upstreams[group.client] = Upstream(group.client)
        return found

    # -- background work --

    def _start_background(self) -> None:
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch()))
        if settings.REDIS_DSN:
            import redis.asyncio as aioredis

            key_states.redis = aioredis.from_url(
                settings.REDIS_DSN, socket_connect_timeout=2, socket_timeout=5
            )
            limits.use_redis(key_states.redis)
            caps.use(key_states.redis)
            self._tasks.append(loop.create_task(self._listen(key_states.redis)))

    async def _watch(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                metrics.tally.flush()
                await self.flush_keys()
                if key_states.redis is not None:
                    await live.counters.push(key_states.redis)
                    await caps.renew()
                await self._refresh()
            except Exception as exc:  # a process edge: keep serving the last snapshot
                if not failing:  # once per outage, not every second
                    log.warning("configuration check failed (%s); serving the last snapshot "
                                "and retrying every second", exc, exc_info=True)  # fmt: skip
                failing = True
            else:
                if failing:
                    log.warning("configuration check works again")
                failing = False

    async def flush_keys(self) -> None:
        if key_states.pending:
            batch, errors = key_states.take()
            try:
                await sync_to_async(write_states, thread_sensitive=False)(batch, errors)
            except Exception:
                key_states.give_back(batch, errors)  # written with the next batch
                raise

    async def _listen(self, redis: Any) -> None:
        """Follows configuration and key-state messages for ever, reconnecting after an
        outage (the proxy serves on local state meanwhile)."""
        warned = False
        while True:
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(CONFIG_CHANNEL, KEYS_CHANNEL)
                    if warned:
                        log.warning("Redis is back; following configuration and key changes")
                        await self.refresh()  # whatever was missed meanwhile
                    warned = False
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self._on_message(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not warned:
                    log.warning("Redis unreachable (%s); serving on local state", exc)
                    warned = True
                await asyncio.sleep(RECONNECT_SECONDS)

    async def _on_message(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        if channel == CONFIG_CHANNEL:
            try:
                await self.refresh()
            except Exception:  # the once-a-second check reports an outage, once
                log.debug("snapshot refresh on a Redis message failed", exc_info=True)
            return
        state = from_other_node(message["data"])
        current = self.snapshot
        view = current.by_id.get(state.group_id) if state and current else None
        if state is not None and view is not None:
            key_states.adopt(view.pool, view.pool.keys.get(state.id), state)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        metrics.tally.flush()
        await self.flush_keys()
        await recorder.stop()
        for upstream in self.upstreams.values():
            await upstream.session.close()
        if key_states.redis is not None:
            await key_states.drain()
            await limits.drain()
            limits.use_redis(None)
            await caps.drain()
            caps.use(None)
            await key_states.redis.aclose()
            key_states.redis = None
        self.upstreams, self.snapshot, self._first = {}, None, None

    def invalidate(self) -> None:
        """Forgets the snapshot (tests): the next request builds a fresh one."""
        with self._lock:
            self.snapshot, self._first = None, None


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
    key_states.write_now()
    recorder.write_now()


atexit.register(_flush_at_exit)
