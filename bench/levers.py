"""The proxy's scale levers, each measured alone: key picks with many keys cooling, a
snapshot rebuild after one group's change, and a full garbage collection with a big
snapshot in memory, each against the way it was done before (issue 9).

    python bench/levers.py                # 200,000 keys, about a minute
    python bench/levers.py --keys 20000   # smoke run

It runs in this process on a fresh SQLite file in a temporary directory (nothing else
is touched) and prints a table; `--json PATH` also writes the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def setup(tmp: Path) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.update({"DJANGO_SETTINGS_MODULE": "gptload.settings", "REDIS_DSN": "",
                       "DATABASE_DSN": f"sqlite:///{tmp / 'levers.db'}", "LOG_LEVEL": "error",
                       "AUTH_KEY": "sk-levers-" + os.urandom(16).hex()})  # fmt: skip
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def seed(keys: int) -> tuple[int, int]:
    """A big group with `keys` keys and a small one with 10; returns their ids."""
    from keys.models import Group
    from keys.services import import_keys

    def group(name: str) -> Group:
        return Group.objects.create(name=name, channel_type="openai", test_model="m",
                                    upstreams=[{"url": "http://127.0.0.1:9", "weight": 1}])  # fmt: skip

    big, small = group("big"), group("small")
    import_keys(big, [f"sk-big-{n:08d}-{os.urandom(8).hex()}" for n in range(keys)])
    import_keys(small, [f"sk-small-{n}-{os.urandom(8).hex()}" for n in range(10)])
    return big.pk, small.pk


def timed(fn: Any, repeat: int) -> float:
    """Median seconds of `repeat` calls."""
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def picks(snapshot: Any, big: int) -> dict[str, float]:
    """µs per pick with 90% of the pool cooling: the ring (now) against a scan of every
    key that skips the cooling ones (before)."""
    from keys.models import KeyStatus

    pool = snapshot.by_id[big].pool
    now = time.time()
    keys = list(pool.keys.values())
    for key in keys[: len(keys) * 9 // 10]:
        key.status, key.cooling_until = KeyStatus.COOLING, now + 3600
        pool.place(key, now)
    calls = 20_000
    ring = timed(lambda: [pool.pick(now) for _ in range(calls)], 3) / calls * 1e6
    turn = iter(range(1 << 62))

    def scan() -> Any:  # the old KeyRing.pick: walk the list until a usable key
        count = len(keys)
        for _ in range(count):
            key = keys[next(turn) % count]
            if key.usable(now):
                return key
        return None

    scans = 200
    old = timed(lambda: [scan() for _ in range(scans)], 3) / scans * 1e6
    for key in keys:
        key.status, key.cooling_until = KeyStatus.ACTIVE, 0.0
    return {"pick_us_ring": ring, "pick_us_scan": old}


def rebuilds(snapshot: Any, small: int) -> tuple[Any, dict[str, float]]:
    """ms to rebuild after a change to the small group: that group alone (now) against
    every group and key (before)."""
    from proxy import snapshot as snapshots
    from settings_app.models import ChangeScope

    change: set[tuple[str, int | None]] = {(ChangeScope.GROUP.value, small)}
    one = timed(lambda: snapshots.apply(snapshot, snapshot.version + 1, change), 5)
    whole = timed(lambda: snapshots.build(snapshot.version + 1, snapshot), 2)
    return snapshot, {"rebuild_ms_one_group": one * 1000, "rebuild_ms_everything": whole * 1000}


def collections() -> dict[str, float]:
    """ms for a full collection with the snapshot in memory, frozen (now) and not."""
    gc.collect()
    gc.unfreeze()
    plain = timed(gc.collect, 5)
    gc.freeze()
    frozen = timed(gc.collect, 5)
    gc.unfreeze()
    return {"full_gc_ms": plain * 1000, "full_gc_ms_frozen": frozen * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gptload-levers-") as tmp:
        setup(Path(tmp))
        from proxy import snapshot as snapshots

        began = time.perf_counter()
        big, small = seed(args.keys)
        print(f"seeded {args.keys:,} keys in {time.perf_counter() - began:.1f} s", flush=True)
        snapshot = snapshots.build(1)
        figures = {"keys": args.keys}
        figures |= picks(snapshot, big)
        snapshot, rebuilt = rebuilds(snapshot, small)
        figures |= rebuilt
        figures |= collections()
        del snapshot
    rows = [
        ("key pick, 90% of the pool cooling (µs)", "pick_us_scan", "pick_us_ring"),
        ("rebuild after one small group's change (ms)", "rebuild_ms_everything", "rebuild_ms_one_group"),
        ("full garbage collection (ms)", "full_gc_ms", "full_gc_ms_frozen"),
    ]  # fmt: skip
    print(f"\n{args.keys:,} keys in one group        before        now")
    for label, before, now in rows:
        print(f"{label:<46} {figures[before]:>9.3f} {figures[now]:>10.3f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
