"""A Redis database of its own for each pytest-xdist worker of the MariaDB + Redis pass.

Loaded with `-p tests.redis_per_worker` (Makefile), so that it runs before Django reads its
settings: worker gwN moves `REDIS_DSN` from database D to D + N. Key-state hashes, live
counters and caches then never mix between workers, and pub/sub channels carry the
database number (`REDIS_CHANNEL_PREFIX`).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

worker = os.environ.get("PYTEST_XDIST_WORKER", "")
dsn = os.environ.get("REDIS_DSN", "")
if worker.startswith("gw") and dsn:
    parts = urlsplit(dsn)
    base = int(parts.path.strip("/") or 0)
    os.environ["REDIS_DSN"] = parts._replace(path=f"/{base + int(worker[2:])}").geturl()


def pytest_sessionstart(session: object) -> None:
    """This run's Redis database starts empty: shared key states, heartbeats and caches
    left by an earlier run (a killed one, say) would otherwise apply to this run's rows,
    whose ids a fresh test database gives out again."""
    if not dsn:
        return
    import redis

    redis.Redis.from_url(os.environ["REDIS_DSN"]).flushdb()
