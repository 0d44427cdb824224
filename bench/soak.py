"""gptload soak: steady load with faults mixed in, for a long time; is anything growing?

Starts the fake provider of the test suite (tests/fakeprovider.py, in this process) and
gptload as `make run` does (`manage.py serve` with its embedded Celery worker, SQLite,
every request logged as it comes), makes one group whose keys misbehave in every way the
fault suite knows (429 with Retry-After, 500s, resets before the first byte, streams cut
midway, slow first bytes, keys that are invalid), and drives it at a steady rate with
plain calls, streams, and clients that hang up mid-stream. Every `--every` seconds it
samples each gptload process (the server, its Celery worker): resident memory, open
files, tasks (threads), and the request-log buffer from /health. After the warm-up, the
figures must stay flat:

  the last third of the samples after the warm-up peaks no higher than the first third
  (RSS within +10 % or +16 MiB, open files and tasks within +8); no request-log rows
  dropped; every call answered 200 (healthy keys are always in the pool), except streams
  the upstream cut after their first bytes, which no gateway can fail over.

  python bench/soak.py                 30 minutes, warm-up 5 (make soak)
  python bench/soak.py --minutes 3     a short run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import Processes, descendants, free_port, gateway_env, run_checked, wait_until_up  # noqa: E402
from tests.fakeprovider import Behaviour, FakeProvider  # noqa: E402

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Counts:
    sent: int = 0
    ok: int = 0
    client_errors: int = 0  # anything but a success the client saw
    hung_up: int = 0  # our own clients leaving mid-stream, on purpose
    cut: int = 0  # streams the upstream broke after their first bytes (no failover then)
    statuses: dict[int, int] = field(default_factory=dict)


@dataclass
class Sample:
    minute: float
    rss_mib: dict[str, float]
    open_files: dict[str, int]
    tasks: dict[str, int]
    log_waiting: int
    log_dropped: int
    sent: int


def proc_figures(pid: int) -> tuple[float, int, int]:
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def roles(server_pid: int) -> dict[str, int]:
    found = {"server": server_pid}
    for pid in descendants(server_pid):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as cmd:
            line = cmd.read()
            if b"celery" in line and b"worker" in line:
                found.setdefault("celery worker", pid)
    return found


def faulty_keys() -> dict[str, Behaviour]:
    """Eleven keys: five healthy, six that fail in each way the providers do."""
    keys = {f"sk-soak-ok-{i}-{secrets.token_hex(8)}": Behaviour() for i in range(5)}
    keys[f"sk-soak-429-{secrets.token_hex(8)}"] = Behaviour(status=429, retry_after="3")
    keys[f"sk-soak-500-{secrets.token_hex(8)}"] = Behaviour(status=500)
    keys[f"sk-soak-reset-{secrets.token_hex(8)}"] = Behaviour(reset=True)
    keys[f"sk-soak-cut-{secrets.token_hex(8)}"] = Behaviour(drop_after=2)
    keys[f"sk-soak-slow-{secrets.token_hex(8)}"] = Behaviour(first_byte_delay=0.5)
    keys[f"sk-soak-401-{secrets.token_hex(8)}"] = Behaviour(status=401)
    return keys


async def one_call(client: httpx.AsyncClient, url: str, headers: dict[str, str],
                   counts: Counts, kind: str) -> None:  # fmt: skip
    counts.sent += 1
    try:
        if kind == "plain":
            answer = await client.post(url, json=CHAT, headers=headers)
            status = answer.status_code
        else:
            async with client.stream("POST", url, json={**CHAT, "stream": True},
                                     headers=headers) as answer:  # fmt: skip
                status = answer.status_code
                chunks = 0
                try:
                    async for _ in answer.aiter_raw():
                        chunks += 1
                        if kind == "hang-up" and chunks >= 2:
                            counts.hung_up += 1
                            return
                except httpx.HTTPError:
                    if status != 200 or not chunks:
                        raise
                    counts.cut += 1
                    return
        counts.statuses[status] = counts.statuses.get(status, 0) + 1
        if status == 200:
            counts.ok += 1
        else:
            counts.client_errors += 1
    except httpx.HTTPError:
        counts.client_errors += 1


async def drive(url: str, proxy_key: str, rate: float, until: float, counts: Counts) -> None:
    """Calls at `rate` per second (a mix of plain, stream and hang-up) until `until`."""
    headers = {"Authorization": f"Bearer {proxy_key}"}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        running: set[asyncio.Task[None]] = set()
        started = time.monotonic()
        n = 0
        while time.monotonic() < until:
            kind = random.choices(["plain", "stream", "hang-up"], [6, 3, 1])[0]
            task = asyncio.create_task(one_call(client, url, headers, counts, kind))
            running.add(task)
            task.add_done_callback(running.discard)
            n += 1
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
        if running:
            await asyncio.wait(running, timeout=60)


async def sample_every(server_pid: int, health: str, auth: str, every: float, until: float,
                       begin: float, counts: Counts, samples: list[Sample]) -> None:  # fmt: skip
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            found = {role: proc_figures(pid) for role, pid in roles(server_pid).items()}
            buffer = (await client.get(health, headers={"Authorization": f"Bearer {auth}"})).json()
            log = buffer.get("request_log", {})
            samples.append(Sample(
                minute=round((time.monotonic() - begin) / 60, 2),
                rss_mib={r: round(f[0], 1) for r, f in found.items()},
                open_files={r: f[1] for r, f in found.items()},
                tasks={r: f[2] for r, f in found.items()},
                log_waiting=int(log.get("waiting", 0)), log_dropped=int(log.get("dropped", 0)),
                sent=counts.sent))  # fmt: skip
            last = samples[-1]
            print(f"  {last.minute:6.1f} min  sent {last.sent:7d}  rss {last.rss_mib}  "
                  f"files {last.open_files}  tasks {last.tasks}  log waiting {last.log_waiting}",
                  flush=True)  # fmt: skip
            if time.monotonic() >= until:
                return
            await asyncio.sleep(min(every, max(0.0, until - time.monotonic())))


def verdict(samples: list[Sample], warm_up: float, counts: Counts) -> tuple[bool, list[str]]:
    """Flat: after the warm-up, the last third of the samples reaches no higher than the
    first third did (RSS within +10 % or +16 MiB, open files and tasks within +8). Open
    files move with the calls in flight and the idle upstream connections kept for reuse;
    a leak shows as a climb from one third to the next."""
    settled = [s for s in samples if s.minute >= warm_up] or samples[-1:]
    third = max(1, len(settled) // 3)
    early, late = settled[:third], settled[-third:]
    lines, ok = [], True
    for role in settled[0].rss_mib:

        def peak(part: list[Sample], figure: str, role: str = role) -> float:
            return max(float(getattr(s, figure).get(role, 0)) for s in part)

        rss_ok = peak(late, "rss_mib") <= max(
            peak(early, "rss_mib") * 1.10, peak(early, "rss_mib") + 16
        )
        files_ok = peak(late, "open_files") <= peak(early, "open_files") + 8
        tasks_ok = peak(late, "tasks") <= peak(early, "tasks") + 8
        ok &= rss_ok and files_ok and tasks_ok
        lines.append(
            f"{role}: peak RSS {peak(early, 'rss_mib'):.1f} -> {peak(late, 'rss_mib'):.1f} MiB "
            f"({'flat' if rss_ok else 'GROWING'}), open files {peak(early, 'open_files'):.0f} -> "
            f"{peak(late, 'open_files'):.0f} ({'flat' if files_ok else 'GROWING'}), tasks "
            f"{peak(early, 'tasks'):.0f} -> {peak(late, 'tasks'):.0f} ({'flat' if tasks_ok else 'GROWING'})"
        )
    dropped = samples[-1].log_dropped
    ok &= dropped == 0 and counts.client_errors == 0
    lines.append(f"calls {counts.sent}: {counts.ok} answered 200, {counts.hung_up} hung up on "
                 f"purpose, {counts.cut} streams cut by the upstream midway, "
                 f"{counts.client_errors} errors ({counts.statuses}); log rows dropped {dropped}")  # fmt: skip
    return ok, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warm-up", type=float, default=5.0, help="minutes before the baseline")
    parser.add_argument("--rate", type=float, default=40.0, help="calls per second")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    args = parser.parse_args()
    warm_up = min(args.warm_up, args.minutes / 3)
    tmp = Path(tempfile.mkdtemp(prefix="gptload-soak-"))
    port, auth_key = free_port(), secrets.token_urlsafe(32)
    env = {**gateway_env(tmp, port, auth_key), "LOG_LEVEL": "warning"}
    processes = Processes()
    keys = faulty_keys()
    proxy_key = "sk-soak-proxy-" + secrets.token_hex(16)
    with FakeProvider() as fake:
        for key, behaviour in keys.items():
            fake.behave(key, behaviour)
        run_checked([sys.executable, str(ROOT / "manage.py"), "migrate", "--no-input", "-v0"],
                    env, tmp, "migrate")  # fmt: skip
        seed = [sys.executable, str(ROOT / "bench" / "seed.py"), "--group", "soak", "--upstream",
                fake.url, "--proxy-key", proxy_key] + [a for k in keys for a in ("--key", k)]  # fmt: skip
        run_checked(seed, env, tmp, "seeding the soak group")
        log = tmp / "gateway.log"
        server = processes.start("gateway", [sys.executable, str(ROOT / "manage.py"), "serve"],
                                 log, env, tmp)  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(base + "/health", server, log, 60)
            httpx.put(f"{base}/api/settings", headers={"Authorization": f"Bearer {auth_key}"},
                      json={"request_log_write_interval_minutes": 0, "request_timeout": 30,
                            "blacklist_threshold": 1}).raise_for_status()  # fmt: skip
            print(f"soak: {args.minutes:g} min at {args.rate:g} calls/s, {len(keys)} keys "
                  f"(6 faulty), samples every {args.every:g} s; work dir {tmp}", flush=True)  # fmt: skip
            counts, samples = Counts(), list[Sample]()
            begin = time.monotonic()
            until = begin + args.minutes * 60

            async def both() -> None:
                await asyncio.gather(
                    drive(f"{base}/proxy/soak/v1/chat/completions", proxy_key, args.rate, until, counts),
                    sample_every(server.pid, base + "/health", auth_key, args.every, until, begin,
                                 counts, samples))  # fmt: skip

            asyncio.run(both())
        finally:
            processes.stop_all()
    ok, lines = verdict(samples, warm_up, counts)
    print("\n".join(["", "soak result (after the warm-up):", *lines, "PASS" if ok else "FAIL"]))
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    out = results / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"minutes": args.minutes, "rate": args.rate, "ok": ok,
                               "summary": lines, "samples": [s.__dict__ for s in samples]},
                              indent=1))  # fmt: skip
    print(f"samples: {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
