"""gptload benchmark: direct vs proxied req/s and added latency, in one command.

Starts a fast fake OpenAI upstream (bench/upstream.py) and gptload under its production
server (`manage.py serve`, one uvicorn worker) on a fresh SQLite database in a temporary
directory, drives both with wrk, and prints a table against the targets:

  added p50 ≤ 1.0 ms at one connection (plain);  ≥ 1,000 req/s plain and ≥ 800 req/s
  streaming (20 events) at 32 connections;  worker RSS ≤ 150 MiB, flat over 100k requests.

On a machine with two or more CPUs the gateway is pinned to the first one and the upstream
and wrk to the others (taskset), so the proxied figures are "per core".

  python bench/run.py            full run (~10 s per scenario + the RSS run, about 4 min)
  python bench/run.py --quick    smoke run (about 40 s)
  python bench/run.py --keep     leave both servers running afterwards, for profiling
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"  # gitignored
GROUP = "bench"
UPSTREAM_KEY_PREFIX = "sk-bench-upstream-"
EVENTS = 20
PLAIN_BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
    "max_tokens": 32,
}
STREAM_BODY = {**PLAIN_BODY, "stream": True, "stream_options": {"include_usage": True}}
MIB = 1024 * 1024
# Other processes using more than this (in cores) during a wrk run make its figures suspect.
NOISE_LIMIT_CORES = 0.1


@dataclass(frozen=True)
class Targets:
    added_p50_ms: float = 1.0
    plain_rps: float = 1000.0
    stream_rps: float = 800.0
    rss_mib: float = 150.0
    # "Flat": a leak of 100 bytes per request would add ~10 MiB over 100k requests.
    rss_growth_mib: float = 10.0
    max_error_ratio: float = 0.001


@dataclass(frozen=True)
class Plan:
    warmup_s: float
    latency_rounds: int
    latency_round_s: float
    throughput_s: float
    rss_requests: int
    rss_chunk_s: float
    connections: int = 32


FULL = Plan(
    warmup_s=5, latency_rounds=5, latency_round_s=2, throughput_s=10, rss_requests=100_000, rss_chunk_s=10
)  # fmt: skip
QUICK = Plan(
    warmup_s=2, latency_rounds=2, latency_round_s=1, throughput_s=3, rss_requests=10_000, rss_chunk_s=3
)  # fmt: skip


# --- small helpers ---------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def die(message: str) -> NoReturn:
    print(f"bench: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(
    method: str, url: str, body: dict[str, Any] | None = None, key: str = "", timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback only
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- wrk ---------------------------------------------------------------------------------


def locate_wrk() -> str:
    """wrk's path; installs Debian's package when missing and running as root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        die("wrk is not installed. Install it first:  sudo apt-get install wrk   (Debian/Ubuntu)")
    say("wrk not found: installing the Debian package (apt-get install wrk)...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "wrk"]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=False)
    return shutil.which("wrk") or die("installing wrk failed; run: apt-get install wrk")


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "?"


WRK_SCRIPT = BENCH_DIR / "wrk.lua"


@dataclass
class WrkRun:
    """One wrk run. Latencies in ms: `p*` are wrk's (corrected for coordinated omission),
    `raw_*` are timed per request by bench/wrk.lua (one-connection runs only)."""

    target: str
    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    error_detail: dict[str, int]
    raw_p50_ms: float | None = None
    raw_p90_ms: float | None = None
    raw_p99_ms: float | None = None
    raw_max_ms: float | None = None
    raw_mean_ms: float | None = None
    gateway_cpu_ms_per_request: float | None = None
    other_cpu_cores: float | None = None  # CPU that processes outside the benchmark used


@dataclass
class Endpoint:
    name: str  # "direct" or "proxied"
    url: str
    key: str
    plain_body: Path
    stream_body: Path


class Load:
    """Runs wrk (bench/wrk.lua) against an endpoint, pinned to the load CPU, and parses it."""

    def __init__(self, wrk: str, pin: list[str], gateway: Gateway, meter: CpuMeter) -> None:
        self.wrk, self.pin, self.gateway, self.meter = wrk, pin, gateway, meter
        self.history: list[WrkRun] = []

    def run(self, endpoint: Endpoint, stream: bool, connections: int, seconds: float) -> WrkRun:
        timed = connections == 1
        env = {
            **os.environ,
            "BENCH_BODY": str(endpoint.stream_body if stream else endpoint.plain_body),
            "BENCH_KEY": endpoint.key,
            "BENCH_TIMED": "1" if timed else "0",
        }
        command = [*self.pin, self.wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                   "--timeout", "10s", "-s", str(WRK_SCRIPT), endpoint.url]  # fmt: skip
        proxied = endpoint.name == "proxied"
        cpu_before, machine_before = self.gateway.cpu_seconds(), self.meter.read()
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        cpu_used = self.gateway.cpu_seconds() - cpu_before if proxied else None
        other = self.meter.other_cores(machine_before, self.meter.read())
        line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
        if out.returncode != 0 or line is None:
            die(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
        run = parse_wrk(json.loads(line.removeprefix("BENCH_JSON ")), endpoint.name,
                        connections, cpu_used)  # fmt: skip
        run.other_cpu_cores = round(other, 3)
        self.history.append(run)
        return run


@dataclass(frozen=True)
class CpuReading:
    wall: float
    busy: float  # user + nice + system of every CPU, seconds
    ours: float  # of the servers, wrk and this process, seconds


class CpuMeter:
    """How much CPU processes other than the benchmark's took: a busy machine skews it all."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK")

    def read(self) -> CpuReading:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        busy = sum(int(x) for x in fields[1:4]) / self.tick
        ours = sum(process_cpu_seconds(pid) for root in self.pids
                   for pid in [root, *descendants(root)])  # fmt: skip
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            ours += usage.ru_utime + usage.ru_stime
        return CpuReading(time.monotonic(), busy, ours)

    @staticmethod
    def other_cores(before: CpuReading, after: CpuReading) -> float:
        wall = after.wall - before.wall
        other = (after.busy - before.busy) - (after.ours - before.ours)
        return max(0.0, other / wall) if wall > 0 else 0.0


def parse_wrk(
    data: dict[str, Any], target: str, connections: int, cpu_used: float | None
) -> WrkRun:
    names = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    detail = {name: int(data[name]) for name in names}
    requests, seconds = int(data["requests"]), data["duration_us"] / 1e6
    ms = {k.removesuffix("_us") + "_ms": v / 1000 for k, v in data.items() if k.endswith("_us")}
    run = WrkRun(
        target=target, connections=connections, seconds=round(seconds, 2), requests=requests,
        rps=requests / seconds if seconds else 0.0,
        p50_ms=ms["p50_ms"], p90_ms=ms["p90_ms"], p99_ms=ms["p99_ms"], max_ms=ms["max_ms"],
        errors=sum(detail.values()), error_detail={k: v for k, v in detail.items() if v},
        raw_p50_ms=ms.get("raw_p50_ms"), raw_p90_ms=ms.get("raw_p90_ms"),
        raw_p99_ms=ms.get("raw_p99_ms"), raw_max_ms=ms.get("raw_max_ms"),
        raw_mean_ms=ms.get("raw_mean_ms"),
    )  # fmt: skip
    if cpu_used is not None and requests:
        run.gateway_cpu_ms_per_request = cpu_used * 1000 / requests
    return run


# --- processes ---------------------------------------------------------------------------


class Processes:
    """The servers this run started; each in its own session, stopped by its own id."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, command: list[str], log: Path, env: dict[str, str], cwd: Path
    ) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.started.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _name, proc in reversed(self.started):
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for _name, proc in reversed(self.started):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.started.clear()


def wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            die(f"{url} did not come up: the process exited ({proc.returncode}).\n{tail(log)}")
        with suppress(OSError):
            if http("GET", url, timeout=2)[0] == 200:
                return
        time.sleep(0.2)
    die(f"{url} did not answer 200 within {timeout:.0f} s.\n{tail(log)}")


@dataclass
class Gateway:
    pid: int
    url: str

    def worker_pids(self) -> list[int]:
        """uvicorn serves in-process with one worker; with several they are spawned children."""
        children = [pid for pid in descendants(self.pid) if b"spawn_main" in cmdline(pid)]
        return children or [self.pid]

    def rss_mib(self) -> float:
        return max(status_kib(pid, "VmRSS") for pid in self.worker_pids()) / 1024

    def peak_rss_mib(self) -> float:
        return max(status_kib(pid, "VmHWM") for pid in self.worker_pids()) / 1024

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(pid) for pid in self.worker_pids())


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [root]
    while queue:
        for child in parents.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def status_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


# --- CPU pinning ---------------------------------------------------------------------------


@dataclass
class Pinning:
    gateway: list[str] = field(default_factory=list)
    upstream: list[str] = field(default_factory=list)
    load: list[str] = field(default_factory=list)
    description: str = "not pinned"


def plan_pinning(enabled: bool) -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    taskset = shutil.which("taskset")
    if not enabled:
        return Pinning(description="not pinned (--no-pin)")
    if not taskset or len(cpus) < 2:
        why = "taskset not found" if not taskset else "only one CPU"
        return Pinning(description=f"not pinned ({why}): figures share one CPU with the load")
    gateway, rest = cpus[0], cpus[1:]
    upstream, load = (rest[0], rest[1]) if len(rest) >= 2 else (rest[0], rest[0])
    # This process only waits on wrk; keep it off the gateway's CPU.
    os.sched_setaffinity(0, set(rest))
    return Pinning(
        gateway=[taskset, "-c", str(gateway)],
        upstream=[taskset, "-c", str(upstream)],
        load=[taskset, "-c", str(load)],
        description=f"gateway on CPU {gateway}; upstream on CPU {upstream}; wrk on CPU {load}",
    )


# --- setting up ----------------------------------------------------------------------------


@dataclass
class World:
    tmp: Path
    env: dict[str, str]
    upstream_url: str
    gateway: Gateway
    proxy_key: str
    upstream_keys: list[str]
    seed: dict[str, Any]
    upstream_pid: int


def gateway_env(tmp: Path, port: int, auth_key: str) -> dict[str, str]:
    """The gateway's environment; also written to <tmp>/gateway.env for a manual restart."""
    forced = {
        "DATABASE_DSN": f"sqlite:///{tmp / 'bench.db'}",
        "REDIS_DSN": "",  # set empty, so that a .env file cannot bring Redis in
        "AUTH_KEY": auth_key,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "IS_SLAVE": "false",
        "DJANGO_DEBUG": "false",
    }
    (tmp / "gateway.env").write_text("".join(f"{k}={v}\n" for k, v in forced.items()))
    env = dict(os.environ)
    for name in ("DJANGO_SETTINGS_MODULE", "LOG_ENABLE_FILE", "STATIC_ROOT"):
        env.pop(name, None)
    return {**env, **forced}


def run_checked(command: list[str], env: dict[str, str], cwd: Path, what: str) -> str:
    out = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        die(f"{what} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out.stdout


def set_up(processes: Processes, pinning: Pinning, keys: int, events: int) -> World:
    tmp = Path(tempfile.mkdtemp(prefix="gptload-bench-"))
    python = sys.executable
    upstream_port, gateway_port = free_port(), free_port()
    auth_key = secrets.token_urlsafe(32)
    proxy_key = "sk-bench-proxy-" + secrets.token_hex(16)
    upstream_keys = [f"{UPSTREAM_KEY_PREFIX}{i:02d}-{secrets.token_hex(12)}" for i in range(keys)]
    env = gateway_env(tmp, gateway_port, auth_key)
    upstream_url = f"http://127.0.0.1:{upstream_port}"

    say(f"work dir: {tmp}")
    say("preparing the database (migrate + the 'bench' group)...")
    run_checked(
        [python, str(ROOT / "manage.py"), "migrate", "--no-input", "-v0"], env, tmp, "migrate"
    )
    seed_cmd = [python, str(BENCH_DIR / "seed.py"), "--group", GROUP, "--upstream", upstream_url,
                "--proxy-key", proxy_key] + [arg for key in upstream_keys for arg in ("--key", key)]  # fmt: skip
    seed = json.loads(run_checked(seed_cmd, env, tmp, "seeding the bench group").splitlines()[-1])

    log = tmp / "upstream.log"
    upstream_cmd = [*pinning.upstream, python, str(BENCH_DIR / "upstream.py"), "--port",
                    str(upstream_port), "--events", str(events), "--key-prefix", UPSTREAM_KEY_PREFIX]  # fmt: skip
    upstream = processes.start("upstream", upstream_cmd, log, env, tmp)
    wait_until_up(upstream_url + "/__stats", upstream, log, 15)

    log = tmp / "gateway.log"
    serve_cmd = [*pinning.gateway, python, str(ROOT / "manage.py"), "serve"]
    proc = processes.start("gateway", serve_cmd, log, env, tmp)
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    wait_until_up(gateway_url + "/health", proc, log, 60)
    return World(tmp, env, upstream_url, Gateway(proc.pid, gateway_url), proxy_key,
                 upstream_keys, seed, upstream.pid)  # fmt: skip


def sanity_check(world: World, events: int) -> dict[str, Any]:
    """One plain and one streamed call through the gateway, before measuring anything."""
    url = f"{world.gateway.url}/proxy/{GROUP}/v1/chat/completions"
    log = world.tmp / "gateway.log"
    status, headers, body = http("POST", url, PLAIN_BODY, world.proxy_key)
    if status != 200 or b'"usage"' not in body:
        die(f"proxied completion answered {status}: {body[:300]!r}\n{tail(log)}")
    overhead = headers.get("X-Gptload-Overhead-Ms") or headers.get("x-gptload-overhead-ms")
    status, _, body = http("POST", url, STREAM_BODY, world.proxy_key)
    got = body.count(b"data: ")
    if status != 200 or got != events + 2 or not body.endswith(b"data: [DONE]\n\n"):
        die(f"proxied stream answered {status} with {got} events (want {events + 2}): "
            f"{body[-300:]!r}\n{tail(log)}")  # fmt: skip
    stats = json.loads(http("GET", world.upstream_url + "/__stats")[2])
    if stats.get("unauthorized"):
        die(
            "the upstream saw requests without an upstream key: the gateway forwarded the proxy key"
        )
    return {"self_reported_overhead_ms": overhead, "upstream_stats": stats}


# --- scenarios -----------------------------------------------------------------------------


@dataclass
class Results:
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    throughput: dict[str, dict[str, Any]] = field(default_factory=dict)
    rss: dict[str, Any] = field(default_factory=dict)
    other_cpu: dict[str, Any] = field(default_factory=dict)


def latency(
    load: Load, direct: Endpoint, proxied: Endpoint, plan: Plan, stream: bool
) -> dict[str, Any]:
    """Alternating rounds at one connection; the median of the per-round percentiles."""
    rounds: dict[str, list[WrkRun]] = {"direct": [], "proxied": []}
    for _ in range(plan.latency_rounds):
        for endpoint in (direct, proxied):
            rounds[endpoint.name].append(load.run(endpoint, stream, 1, plan.latency_round_s))
    summary: dict[str, Any] = {"rounds": {k: [asdict(r) for r in v] for k, v in rounds.items()}}
    for name, runs in rounds.items():
        summary[name] = {
            stat: statistics.median(raw_or_wrk(r, stat) for r in runs)
            for stat in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")
        }
        summary[name].update(
            rps=statistics.median(r.rps for r in runs),
            wrk_corrected_p99_ms=statistics.median(r.p99_ms for r in runs),
            errors=sum(r.errors for r in runs),
            requests=sum(r.requests for r in runs),
        )
    cpu = [r.gateway_cpu_ms_per_request for r in rounds["proxied"] if r.gateway_cpu_ms_per_request]
    summary["proxied"]["gateway_cpu_ms_per_request"] = statistics.median(cpu) if cpu else None
    for stat in ("p50_ms", "p99_ms", "mean_ms"):
        summary["added_" + stat] = summary["proxied"][stat] - summary["direct"][stat]
    return summary


def raw_or_wrk(run: WrkRun, stat: str) -> float:
    """The per-request timing of bench/wrk.lua; wrk's own figure if it is missing."""
    raw = getattr(run, "raw_" + stat)
    if raw is not None:
        return float(raw)
    return run.seconds * 1000 / run.requests if stat == "mean_ms" else float(getattr(run, stat))


def throughput(
    load: Load, direct: Endpoint, proxied: Endpoint, plan: Plan, stream: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for endpoint in (direct, proxied):
        run = load.run(endpoint, stream, plan.connections, plan.throughput_s)
        out[endpoint.name] = asdict(run)
    out["ratio"] = out["proxied"]["rps"] / out["direct"]["rps"] if out["direct"]["rps"] else None
    return out


def rss_run(
    load: Load, gateway: Gateway, proxied: Endpoint, plan: Plan, after_warmup: float
) -> dict[str, Any]:
    """≥ plan.rss_requests proxied requests in chunks (plain, streaming, …), RSS after each."""
    start = gateway.rss_mib()
    samples: list[dict[str, Any]] = [{"requests": 0, "rss_mib": round(start, 1)}]
    total, errors, chunk, began = 0, 0, 0, time.monotonic()
    while total < plan.rss_requests and time.monotonic() - began < 900:
        run = load.run(proxied, chunk % 2 == 1, plan.connections, plan.rss_chunk_s)
        total, errors, chunk = total + run.requests, errors + run.errors, chunk + 1
        samples.append({"requests": total, "rss_mib": round(gateway.rss_mib(), 1)})
        say(f"  RSS run: {total:>7,} requests, RSS {samples[-1]['rss_mib']:.1f} MiB")
    end = samples[-1]["rss_mib"]
    return {
        "after_warmup_mib": round(after_warmup, 1),
        "start_mib": round(start, 1),
        "end_mib": end,
        "max_mib": max(s["rss_mib"] for s in samples),
        "peak_hwm_mib": round(gateway.peak_rss_mib(), 1),
        "growth_mib": round(end - start, 1),
        "requests": total,
        "errors": errors,
        "bytes_per_request": round((end - start) * MIB / total, 1) if total else None,
        "samples": samples,
        "worker_pids": gateway.worker_pids(),
    }


def measure(world: World, wrk: str, pinning: Pinning, plan: Plan) -> Results:
    plain_body, stream_body = world.tmp / "plain.json", world.tmp / "stream.json"
    plain_body.write_text(json.dumps(PLAIN_BODY))
    stream_body.write_text(json.dumps(STREAM_BODY))
    direct = Endpoint("direct", world.upstream_url + "/v1/chat/completions",
                      world.upstream_keys[0], plain_body, stream_body)  # fmt: skip
    proxied = Endpoint("proxied", f"{world.gateway.url}/proxy/{GROUP}/v1/chat/completions",
                       world.proxy_key, plain_body, stream_body)  # fmt: skip
    meter = CpuMeter([world.gateway.pid, world.upstream_pid])
    load = Load(wrk, pinning.load, world.gateway, meter)
    results = Results()

    say(
        f"warming up ({plan.warmup_s:.0f} s plain + {plan.warmup_s:.0f} s streaming, 32 connections)..."
    )
    load.run(proxied, False, plan.connections, plan.warmup_s)
    load.run(proxied, True, plan.connections, plan.warmup_s)
    load.run(direct, False, plan.connections, 1)
    after_warmup = world.gateway.rss_mib()

    for stream in (False, True):
        kind = "stream" if stream else "plain"
        say(f"latency, 1 connection, {kind}: {plan.latency_rounds} alternating rounds of "
            f"{plan.latency_round_s:.0f} s...")  # fmt: skip
        results.latency[kind] = latency(load, direct, proxied, plan, stream)
    for stream in (False, True):
        kind = "stream" if stream else "plain"
        say(
            f"throughput, {plan.connections} connections, {kind}: {plan.throughput_s:.0f} s each..."
        )
        results.throughput[kind] = throughput(load, direct, proxied, plan, stream)
    if plan.rss_requests > 0:
        say(f"RSS run: {plan.rss_requests:,} proxied requests, plain and streaming in turn...")
        results.rss = rss_run(load, world.gateway, proxied, plan, after_warmup)
    other = [r.other_cpu_cores or 0.0 for r in load.history]
    results.other_cpu = {
        "mean_cores": round(statistics.fmean(other), 3),
        "max_cores": round(max(other), 3),
        "runs_over_limit": sum(x > NOISE_LIMIT_CORES for x in other),
        "runs": len(other),
    }
    return results


# --- report --------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    direct: str
    proxied: str
    delta: str
    target: str
    verdict: str  # PASS, FAIL or "" (informational)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def errors_ok(count: int, requests: int, targets: Targets) -> bool:
    return requests > 0 and count <= requests * targets.max_error_ratio


def build_rows(results: Results, targets: Targets, plan: Plan) -> list[Row]:
    rows: list[Row] = []
    for kind, label in (("plain", "plain"), ("stream", f"stream {EVENTS} ev")):
        lat = results.latency[kind]
        d, p = lat["direct"], lat["proxied"]
        ok = errors_ok(p["errors"], p["requests"], targets)
        for stat in ("p50", "p99", "mean"):
            gated = kind == "plain" and stat == "p50"
            added = lat[f"added_{stat}_ms"]
            result = verdict(ok and added <= targets.added_p50_ms) if gated else ""
            rows.append(Row(
                f"latency {stat}, 1 conn, {label} (ms)", f"{d[stat + '_ms']:.3f}",
                f"{p[stat + '_ms']:.3f}", f"{added:+.3f}",
                f"added ≤ {targets.added_p50_ms:.1f}" if gated else "",
                result if ok else "FAIL",
            ))  # fmt: skip
    for kind, label, goal in (
        ("plain", "plain", targets.plain_rps),
        ("stream", f"stream {EVENTS} ev", targets.stream_rps),
    ):
        t = results.throughput[kind]
        d, p = t["direct"], t["proxied"]
        ok = errors_ok(p["errors"], p["requests"], targets) and p["rps"] >= goal
        rows.append(Row(
            f"req/s, {plan.connections} conn, {label}", f"{d['rps']:,.0f}", f"{p['rps']:,.0f}",
            f"{t['ratio']:.1%}" if t["ratio"] else "", f"≥ {goal:,.0f}", verdict(ok),
        ))  # fmt: skip
        cpu = p.get("gateway_cpu_ms_per_request")
        if cpu:
            rows.append(Row("  gateway CPU per request (ms)", "", f"{cpu:.3f}", "", "", ""))
    rows.extend(rss_rows(results.rss, targets, plan))
    return rows


def rss_rows(rss: dict[str, Any], targets: Targets, plan: Plan) -> list[Row]:
    if not rss:
        return [Row("worker RSS", "", "skipped", "", "", "")]
    flat = (
        rss["growth_mib"] <= targets.rss_growth_mib
        and rss["requests"] >= plan.rss_requests
        and errors_ok(rss["errors"], rss["requests"], targets)
    )
    return [
        Row("worker RSS after warm-up / max (MiB)", "",
            f"{rss['after_warmup_mib']:.1f} / {rss['max_mib']:.1f}", "",
            f"≤ {targets.rss_mib:.0f}", verdict(rss["max_mib"] <= targets.rss_mib)),
        Row(f"worker RSS over {rss['requests']:,} more req (MiB)", "",
            f"{rss['start_mib']:.1f} → {rss['end_mib']:.1f}", f"{rss['growth_mib']:+.1f}",
            f"≤ +{targets.rss_growth_mib:.0f}", verdict(flat)),
    ]  # fmt: skip


def print_table(rows: list[Row]) -> None:
    headers = Row("scenario", "direct", "proxied", "added / ratio", "target", "result")
    table = [headers, *rows]
    widths = [max(len(getattr(r, f)) for r in table) for f in Row.__dataclass_fields__]
    for i, row in enumerate(table):
        cells = [getattr(row, f) for f in Row.__dataclass_fields__]
        say(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
        if i == 0:
            say("  ".join("-" * w for w in widths))


def environment(wrk: str, pinning: Pinning, mode: str) -> dict[str, Any]:
    cpu = "?"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("django", "uvicorn", "httpx", "aiohttp", "uvloop", "httptools"):
        with suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return {
        "mode": mode,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": commit or None,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "pinning": pinning.description,
        "wrk": wrk_version(wrk),
        "versions": versions,
        "web_workers": 1,
    }


def save(
    report: dict[str, Any],
    explicit: Path | None,
    prefix: str = "bench",
    latest: str = "latest.json",
) -> Path:
    """Writes `report` as JSON to `explicit`, or to a timestamped file and `latest`."""
    path = explicit or RESULTS_DIR / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=str)
    path.write_text(text)
    if explicit is None:
        (RESULTS_DIR / latest).write_text(text)
    return path


# --- main ----------------------------------------------------------------------------------


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short smoke run (a few seconds per scenario, 10k-request RSS run)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the upstream and the gateway running (and the work dir) for profiling",
    )
    parser.add_argument(
        "--seconds", type=float, help="seconds per throughput run (default 10, --quick 3)"
    )
    parser.add_argument(
        "--rss-requests",
        type=int,
        help="proxied requests in the RSS run (default 100000, --quick 10000)",
    )
    parser.add_argument(
        "--keys",
        type=int,
        default=20,
        help="upstream keys in the bench group (default %(default)s)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--json",
        type=Path,
        help="write the results here (default bench/results/bench-<time>.json and latest.json)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return parser.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.seconds:
        plan = Plan(**{**asdict(plan), "throughput_s": args.seconds})
    if args.rss_requests is not None:
        plan = Plan(**{**asdict(plan), "rss_requests": args.rss_requests})
    targets = Targets()
    wrk = locate_wrk()
    pinning = plan_pinning(not args.no_pin)
    processes = Processes()
    world: World | None = None
    finished = False
    say(f"gptload bench ({'quick' if args.quick else 'full'}): {pinning.description}")
    idle_check = CpuMeter([])
    before = idle_check.read()
    time.sleep(1)
    if (busy := idle_check.other_cores(before, idle_check.read())) > NOISE_LIMIT_CORES:
        say(f"note: other processes are using {busy:.2f} cores right now; results will suffer")
    try:
        with sigterm_as_interrupt():
            world = set_up(processes, pinning, args.keys, EVENTS)
            say(f"upstream {world.upstream_url} (pid {world.upstream_pid}); gateway "
                f"{world.gateway.url} (pid {world.gateway.pid}, worker {world.gateway.worker_pids()})")  # fmt: skip
            check = sanity_check(world, EVENTS)
            results = measure(world, wrk, pinning, plan)
            rows = build_rows(results, targets, plan)
            finished = True
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    finally:
        if world is not None and args.keep:
            say(keep_message(world, processes))
        else:
            processes.stop_all()
            if world is not None and finished:
                shutil.rmtree(world.tmp, ignore_errors=True)
            elif world is not None:
                say(f"logs kept in {world.tmp}")
    say()
    print_table(rows)
    report = {
        "environment": environment(wrk, pinning, "quick" if args.quick else "full"),
        "plan": asdict(plan),
        "targets": asdict(targets),
        "group": world.seed,
        "sanity": check,
        "table": [asdict(r) for r in rows],
        "results": asdict(results),
    }
    path = save(report, args.json)
    failed = [r.scenario for r in rows if r.verdict == "FAIL"]
    say()
    say(
        f"{pinning.description}; one web worker; wrk -t1, POST {len(json.dumps(PLAIN_BODY))}-byte body."
    )
    say(f"results: {path}")
    noise = results.other_cpu
    if noise["runs_over_limit"]:
        say(f"WARNING: other processes used up to {noise['max_cores']:.2f} cores (mean "
            f"{noise['mean_cores']:.2f}) during {noise['runs_over_limit']} of {noise['runs']} "
            "wrk runs: the machine was not quiet, so these figures understate the gateway.")  # fmt: skip
    if failed:
        say(f"missed: {'; '.join(failed)}")
    return 1 if failed and args.strict else 0


def keep_message(world: World, processes: Processes) -> str:
    pids = " ".join(str(p.pid) for _, p in processes.started)
    return (
        f"\n--keep: servers left running (work dir {world.tmp}):\n"
        f"  upstream {world.upstream_url}  gateway {world.gateway.url} "
        f"(worker pid {' '.join(map(str, world.gateway.worker_pids()))})\n"
        f"  proxy key {world.proxy_key}\n"
        f"  curl -s {world.gateway.url}/proxy/{GROUP}/v1/chat/completions "
        f"-H 'Authorization: Bearer {world.proxy_key}' -H 'Content-Type: application/json' "
        f"-d '{json.dumps(PLAIN_BODY)}'\n"
        f"  load: BENCH_BODY={world.tmp}/plain.json BENCH_KEY={world.proxy_key} "
        f"wrk -t1 -c32 -d10s -s {WRK_SCRIPT} {world.gateway.url}/proxy/{GROUP}/v1/chat/completions\n"
        f"  gateway environment: {world.tmp}/gateway.env (cd {world.tmp} && "
        f"env $(cat gateway.env) {sys.executable} {ROOT}/manage.py serve)\n"
        f"  stop them: kill {pids}"
    )


if __name__ == "__main__":
    sys.exit(main())
