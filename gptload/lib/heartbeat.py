"""Heartbeats of the background processes: is a Celery worker running, is beat?

A Celery worker notes that it is alive every `INTERVAL` seconds from a thread of its own
(started when it is ready); beat notes it from its scheduler's loop, so a beat whose
scheduler stopped turning goes quiet even if its process lives (`gptload.celery` wires
both). A process not heard from for `STALE_AFTER` seconds is taken to be gone:
`/health/ready` says the node is not ready and the console's dashboard warns
(`background()` answers both, and `/metrics` shows the times).

Where the notes are kept: with Redis, in the cache (every node and worker shares it);
without, as files beside the embedded broker's queue (`CELERY_DATA_DIR`), which every
process of a Redis-less installation shares, as it shares the broker. A clean stop
removes nothing: a worker that went is noticed `STALE_AFTER` seconds later whichever way
it went.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.cache import cache

log = logging.getLogger("gptload")
INTERVAL = 30.0  # seconds between two notes of a live process
STALE_AFTER = 180.0  # seconds without a note: the process is gone
WORKER, BEAT = "worker", "beat"
ROLES = (WORKER, BEAT)


def note(role: str) -> None:
    """Records that a process of `role` (WORKER or BEAT) is alive now."""
    if settings.REDIS_DSN:
        cache.set(f"heartbeat:{role}", time.time(), timeout=None)
    else:
        path = _file(role)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def last_seen(role: str) -> float | None:
    """When a process of `role` last noted it was alive (a Unix time), None if never.

    Raises what the cache raises when Redis cannot be reached."""
    if settings.REDIS_DSN:
        seen = cache.get(f"heartbeat:{role}")
        return float(seen) if seen is not None else None
    try:
        return _file(role).stat().st_mtime
    except FileNotFoundError:
        return None


def _file(role: str) -> Path:
    return Path(settings.CELERY_DATA_DIR) / f"heartbeat-{role}"


@dataclass(frozen=True)
class Seen:
    role: str
    at: float | None  # when it was last heard from; None: never (or unknown)
    alive: bool
    error: str = ""  # why it could not be read (the store is away)


def background(now: float | None = None) -> dict[str, Seen]:
    """The worker's and beat's last heartbeats, and whether each is recent enough."""
    at = time.time() if now is None else now
    found = {}
    for role in ROLES:
        try:
            seen = last_seen(role)
        except Exception as exc:  # the store is away: nothing can be said about the process
            found[role] = Seen(role, None, False, f"{type(exc).__name__}: {exc}"[:300])
            continue
        found[role] = Seen(role, seen, seen is not None and at - seen <= STALE_AFTER)
    return found


class Pulse:
    """A daemon thread that notes `role` now, then every `INTERVAL` seconds until stopped."""

    def __init__(self, role: str) -> None:
        self.role = role
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{role}-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                note(self.role)
            except Exception as exc:  # a process edge: try again at the next beat
                if not failing:
                    log.warning("%s heartbeat not recorded (%s); retrying", self.role, exc)
                failing = True
            else:
                failing = False
            self._stop.wait(INTERVAL)
