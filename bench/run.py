"""gptload benchmark: direct vs reference vs proxied req/s and added latency, in one command.

Starts a fast fake OpenAI upstream (bench/upstream.py), a bare aiohttp forwarder as a
yardstick (bench/reference.py) and gptload under its production server (`manage.py serve`,
one uvicorn worker) on a fresh SQLite database in a temporary directory, drives all three
with wrk, and prints a table against the targets:

  added p50 ≤ 1.0 ms at one connection (plain);  ≥ 1,000 req/s plain and ≥ 800 req/s
  streaming (20 events) at 32 connections;  worker RSS ≤ 150 MiB, flat over 100k requests;
  against the reference: ≥ 40% of its req/s plain, ≥ 60% streaming, and an added p50 at
  most 0.5 ms above the reference's.

On a machine with two or more CPUs the gateway and the reference are pinned to the first
one and the upstream and wrk to the others (taskset), so the proxied figures are "per core".

  python bench/run.py            full run (~10 s per scenario + the RSS run, about 5 min)
  python bench/run.py --quick    smoke run (about 1 min)
  python bench/run.py --keep     leave the servers running afterwards, for profiling
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
from typing import Any, NoReturn, Protocol

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
    # Against bench/reference.py, same core, same load: what the framework and the features cost.
    reference_plain_ratio: float = 0.40
    reference_stream_ratio: float = 0.60
    reference_added_p50_ms: float = 0.5  # gptload's added p50 minus the reference's
    # Issue 13: an access key with every limit on costs at most 10% more than a proxy key.
    access_cost_ratio: float = 0.10


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
    # CPU of the server behind the endpoint (gateway or reference); None for direct runs.
    server_cpu_ms_per_request: float | None = None
    other_cpu_cores: float | None = None  # CPU that processes outside the benchmark used


class Server(Protocol):
    def cpu_seconds(self) -> float: ...


@dataclass
class Endpoint:
    name: str  # "direct", "reference", "proxied" or "limited" (an access key, limits on)
    url: str
    key: str
    plain_body: Path
    stream_body: Path
    server: Server | None = None  # whose CPU time a run is charged to


class Load:
    """Runs wrk (bench/wrk.lua) against an endpoint, pinned to the load CPU, and parses it."""

    def __init__(self, wrk: str, pin: list[str], meter: CpuMeter) -> None:
        self.wrk, self.pin, self.meter = wrk, pin, meter
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
        server = endpoint.server
        cpu_before = server.cpu_seconds() if server else 0.0
        machine_before = self.meter.read()
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        cpu_used = server.cpu_seconds() - cpu_before if server else None
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
        run.server_cpu_ms_per_request = cpu_used * 1000 / requests
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


@dataclass
class Reference:
    """bench/reference.py: one process (taskset execs it), serving in itself."""

    pid: int
    url: str
    keys_file: Path

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def rss_mib(self) -> float:
        return status_kib(self.pid, "VmRSS") / 1024

    def peak_rss_mib(self) -> float:
        return status_kib(self.pid, "VmHWM") / 1024


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
    # This process only waits on wrk; keep it off the gateway's CPU (the reference's too).
    os.sched_setaffinity(0, set(rest))
    return Pinning(
        gateway=[taskset, "-c", str(gateway)],
        upstream=[taskset, "-c", str(upstream)],
        load=[taskset, "-c", str(load)],
        description=f"gateway and reference on CPU {gateway}; upstream on CPU {upstream}; "
        f"wrk on CPU {load}",
    )


# --- setting up ----------------------------------------------------------------------------


@dataclass
class World:
    tmp: Path
    env: dict[str, str]
    upstream_url: str
    gateway: Gateway
    proxy_key: str
    access_key: str
    upstream_keys: list[str]
    seed: dict[str, Any]
    upstream_pid: int
    reference: Reference


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


def set_up(
    processes: Processes, pinning: Pinning, keys: int, events: int, config: str = ""
) -> World:
    tmp = Path(tempfile.mkdtemp(prefix="gptload-bench-"))
    python = sys.executable
    upstream_port, gateway_port = free_port(), free_port()
    auth_key = secrets.token_urlsafe(32)
    proxy_key = "sk-bench-proxy-" + secrets.token_hex(16)
    access_key = "gl-bench-" + secrets.token_urlsafe(32)
    upstream_keys = [f"{UPSTREAM_KEY_PREFIX}{i:02d}-{secrets.token_hex(12)}" for i in range(keys)]
    env = gateway_env(tmp, gateway_port, auth_key)
    upstream_url = f"http://127.0.0.1:{upstream_port}"

    say(f"work dir: {tmp}")
    say("preparing the database (migrate + the 'bench' group)...")
    run_checked(
        [python, str(ROOT / "manage.py"), "migrate", "--no-input", "-v0"], env, tmp, "migrate"
    )
    seed_cmd = [
        python,
        str(BENCH_DIR / "seed.py"),
        "--group",
        GROUP,
        "--upstream",
        upstream_url,
        "--proxy-key",
        proxy_key,
        "--access-key",
        access_key,
    ]
    seed_cmd += [arg for key in upstream_keys for arg in ("--key", key)]  # fmt: skip
    if config:
        seed_cmd += ["--config", config]
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

    # Same keys, upstream and CPU as the gateway: only the software between them differs.
    reference = start_reference(processes, pinning, tmp, env, upstream_url, proxy_key,
                                upstream_keys)  # fmt: skip
    return World(tmp, env, upstream_url, Gateway(proc.pid, gateway_url), proxy_key, access_key,
                 upstream_keys, seed, upstream.pid, reference)  # fmt: skip


def start_reference(
    processes: Processes,
    pinning: Pinning,
    tmp: Path,
    env: dict[str, str],
    upstream_url: str,
    proxy_key: str,
    upstream_keys: list[str],
) -> Reference:
    keys_file = tmp / "upstream-keys.txt"
    keys_file.write_text("".join(key + "\n" for key in upstream_keys))
    port, log = free_port(), tmp / "reference.log"
    command = [*pinning.gateway, sys.executable, str(BENCH_DIR / "reference.py"), "--port",
               str(port), "--group", GROUP, "--upstream", upstream_url, "--proxy-key", proxy_key,
               "--keys-file", str(keys_file)]  # fmt: skip
    proc = processes.start("reference", command, log, env, tmp)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url + "/health", proc, log, 15)
    return Reference(proc.pid, url, keys_file)


def sanity_check(world: World, events: int) -> dict[str, Any]:
    """One plain and one streamed call through the gateway and the reference, before
    measuring anything."""
    overhead = check_forwarder("gateway", world.gateway.url, world, events)
    check_forwarder("reference", world.reference.url, world, events)
    stats = json.loads(http("GET", world.upstream_url + "/__stats")[2])
    return {"self_reported_overhead_ms": overhead, "upstream_stats": stats}


def check_forwarder(name: str, base_url: str, world: World, events: int) -> str | None:
    """Dies unless `name` answers a completion and a stream right, with an upstream key."""
    url = f"{base_url}/proxy/{GROUP}/v1/chat/completions"
    log = world.tmp / f"{name}.log"
    status, headers, body = http("POST", url, PLAIN_BODY, world.proxy_key)
    if status != 200 or b'"usage"' not in body:
        die(f"{name}: completion answered {status}: {body[:300]!r}\n{tail(log)}")
    overhead = headers.get("X-Gptload-Overhead-Ms") or headers.get("x-gptload-overhead-ms")
    status, _, body = http("POST", url, STREAM_BODY, world.proxy_key)
    got = body.count(b"data: ")
    if status != 200 or got != events + 2 or not body.endswith(b"data: [DONE]\n\n"):
        die(f"{name}: stream answered {status} with {got} events (want {events + 2}): "
            f"{body[-300:]!r}\n{tail(log)}")  # fmt: skip
    stats = json.loads(http("GET", world.upstream_url + "/__stats")[2])
    if stats.get("unauthorized"):
        die(
            f"{name}: the upstream saw requests without an upstream key: it forwarded the proxy key"
        )
    return overhead


# --- scenarios -----------------------------------------------------------------------------


@dataclass
class Results:
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    throughput: dict[str, dict[str, Any]] = field(default_factory=dict)
    rss: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    other_cpu: dict[str, Any] = field(default_factory=dict)


def latency(load: Load, endpoints: list[Endpoint], plan: Plan, stream: bool) -> dict[str, Any]:
    """Interleaved rounds at one connection (so drift hits every endpoint alike); the median
    of the per-round percentiles."""
    rounds: dict[str, list[WrkRun]] = {endpoint.name: [] for endpoint in endpoints}
    for _ in range(plan.latency_rounds):
        for endpoint in endpoints:
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
        cpu = [r.server_cpu_ms_per_request for r in runs if r.server_cpu_ms_per_request]
        if name != "direct":
            summary[name]["server_cpu_ms_per_request"] = statistics.median(cpu) if cpu else None
    for stat in ("p50_ms", "p99_ms", "mean_ms"):
        summary["added_" + stat] = summary["proxied"][stat] - summary["direct"][stat]
        summary["reference_added_" + stat] = summary["reference"][stat] - summary["direct"][stat]
        # What gptload adds on top of a bare forwarder: the target is on this one.
        summary["added_over_reference_" + stat] = (
            summary["added_" + stat] - summary["reference_added_" + stat]
        )
        if "limited" in summary:  # gptload's added time with an access key, limits on
            summary["limited_added_" + stat] = summary["limited"][stat] - summary["direct"][stat]
    return summary


def raw_or_wrk(run: WrkRun, stat: str) -> float:
    """The per-request timing of bench/wrk.lua; wrk's own figure if it is missing."""
    raw = getattr(run, "raw_" + stat)
    if raw is not None:
        return float(raw)
    return run.seconds * 1000 / run.requests if stat == "mean_ms" else float(getattr(run, stat))


PAIRED = ("proxied", "limited")  # gptload with a proxy key, and with an access key
PAIRED_ROUNDS = 3


def throughput(load: Load, endpoints: list[Endpoint], plan: Plan, stream: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    paired = [endpoint for endpoint in endpoints if endpoint.name in PAIRED]
    for endpoint in endpoints:
        if endpoint not in paired:
            out[endpoint.name] = asdict(load.run(endpoint, stream, plan.connections,
                                                 plan.throughput_s))  # fmt: skip
    # gptload with each credential in interleaved rounds, the median round of each: a log
    # flush (once a minute) or a burst elsewhere then lands on both alike.
    rounds: dict[str, list[WrkRun]] = {endpoint.name: [] for endpoint in paired}
    for _ in range(PAIRED_ROUNDS if len(paired) > 1 else 1):
        for endpoint in paired:
            seconds = plan.throughput_s / (PAIRED_ROUNDS if len(paired) > 1 else 1)
            rounds[endpoint.name].append(load.run(endpoint, stream, plan.connections, seconds))
    for name, runs in rounds.items():
        out[name] = asdict(sorted(runs, key=lambda run: run.rps)[len(runs) // 2])
        out[name]["errors"] = sum(run.errors for run in runs)
        out[name]["requests"] = sum(run.requests for run in runs)
    proxied, direct, reference = (
        out["proxied"]["rps"],
        out["direct"]["rps"],
        out["reference"]["rps"],
    )
    out["ratio"] = proxied / direct if direct else None
    out["reference_ratio"] = proxied / reference if reference else None
    if "limited" in out:
        out["limited_ratio"] = out["limited"]["rps"] / proxied if proxied else None
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
    reference = Endpoint("reference", f"{world.reference.url}/proxy/{GROUP}/v1/chat/completions",
                         world.proxy_key, plain_body, stream_body, world.reference)  # fmt: skip
    proxied = Endpoint("proxied", f"{world.gateway.url}/proxy/{GROUP}/v1/chat/completions",
                       world.proxy_key, plain_body, stream_body, world.gateway)  # fmt: skip
    limited = Endpoint("limited", proxied.url, world.access_key, plain_body, stream_body,
                       world.gateway)  # fmt: skip
    endpoints = [direct, reference, proxied, limited]
    meter = CpuMeter([world.gateway.pid, world.upstream_pid, world.reference.pid])
    load = Load(wrk, pinning.load, meter)
    results = Results()

    say(f"warming up ({plan.warmup_s:.0f} s plain + {plan.warmup_s:.0f} s streaming, "
        f"{plan.connections} connections, reference then gateway)...")  # fmt: skip
    for endpoint in (reference, proxied):
        load.run(endpoint, False, plan.connections, plan.warmup_s)
        load.run(endpoint, True, plan.connections, plan.warmup_s)
    load.run(direct, False, plan.connections, 1)
    after_warmup = world.gateway.rss_mib()
    results.reference["after_warmup_rss_mib"] = round(world.reference.rss_mib(), 1)

    for stream in (False, True):
        kind = "stream" if stream else "plain"
        say(f"latency, 1 connection, {kind}: {plan.latency_rounds} interleaved rounds of "
            f"{plan.latency_round_s:.0f} s (direct, reference, gateway)...")  # fmt: skip
        results.latency[kind] = latency(load, endpoints, plan, stream)
    for stream in (False, True):
        kind = "stream" if stream else "plain"
        say(f"throughput, {plan.connections} connections, {kind}: {plan.throughput_s:.0f} s "
            "each (direct, reference, gateway)...")  # fmt: skip
        results.throughput[kind] = throughput(load, endpoints, plan, stream)
    results.reference.update(
        end_rss_mib=round(world.reference.rss_mib(), 1),
        peak_hwm_mib=round(world.reference.peak_rss_mib(), 1),
        pid=world.reference.pid,
    )
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
    reference: str
    proxied: str  # gptload
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
        d, r, p = lat["direct"], lat["reference"], lat["proxied"]
        ok = errors_ok(p["errors"], p["requests"], targets)
        # A yardstick that failed requests measures nothing: its comparisons fail too.
        both_ok = ok and errors_ok(r["errors"], r["requests"], targets)
        for stat in ("p50", "p99", "mean"):
            gated = kind == "plain" and stat == "p50"
            added = lat[f"added_{stat}_ms"]
            result = verdict(ok and added <= targets.added_p50_ms) if gated else ""
            rows.append(Row(
                f"latency {stat}, 1 conn, {label} (ms)", f"{d[stat + '_ms']:.3f}",
                f"{r[stat + '_ms']:.3f}", f"{p[stat + '_ms']:.3f}", f"{added:+.3f}",
                f"added ≤ {targets.added_p50_ms:.1f}" if gated else "",
                result if ok else "FAIL",
            ))  # fmt: skip
            if stat != "p50":
                continue
            over = lat["added_over_reference_p50_ms"]
            goal = targets.reference_added_p50_ms
            result = verdict(both_ok and over <= goal) if gated else ""
            rows.append(Row(
                f"  added p50, {label}: gptload − reference (ms)", "",
                f"{lat['reference_added_p50_ms']:+.3f}", f"{lat['added_p50_ms']:+.3f}",
                f"{over:+.3f}", f"≤ +{goal:.1f}" if gated else "",
                result if both_ok else "FAIL",
            ))  # fmt: skip
    for kind, label, goal, ratio_goal in (
        ("plain", "plain", targets.plain_rps, targets.reference_plain_ratio),
        ("stream", f"stream {EVENTS} ev", targets.stream_rps, targets.reference_stream_ratio),
    ):
        t = results.throughput[kind]
        d, r, p = t["direct"], t["reference"], t["proxied"]
        ok = errors_ok(p["errors"], p["requests"], targets)
        rows.append(Row(
            f"req/s, {plan.connections} conn, {label}", f"{d['rps']:,.0f}", f"{r['rps']:,.0f}",
            f"{p['rps']:,.0f}", f"{t['ratio']:.1%}" if t["ratio"] else "", f"≥ {goal:,.0f}",
            verdict(ok and p["rps"] >= goal),
        ))  # fmt: skip
        ratio = t["reference_ratio"]
        both_ok = ok and errors_ok(r["errors"], r["requests"], targets)
        rows.append(Row(
            f"  req/s, {label}: gptload ÷ reference", "", f"{r['rps']:,.0f}", f"{p['rps']:,.0f}",
            f"{ratio:.1%}" if ratio else "", f"≥ {ratio_goal:.0%}",
            verdict(both_ok and ratio is not None and ratio >= ratio_goal),
        ))  # fmt: skip
        ref_cpu, cpu = r.get("server_cpu_ms_per_request"), p.get("server_cpu_ms_per_request")
        if cpu or ref_cpu:
            rows.append(Row("  CPU per request (ms)", "", f"{ref_cpu or 0:.3f}",
                            f"{cpu or 0:.3f}", "", "", ""))  # fmt: skip
    rows.extend(access_rows(results, targets))
    rows.extend(rss_rows(results.rss, targets, plan))
    return rows


def access_rows(results: Results, targets: Targets) -> list[Row]:
    """An access key with every limit on against the proxy key, same gateway, interleaved:
    the added p50 and the req/s may differ by `access_cost_ratio` at most."""
    rows: list[Row] = []
    goal = targets.access_cost_ratio
    for kind, label in (("plain", "plain"), ("stream", f"stream {EVENTS} ev")):
        lat, t = results.latency[kind], results.throughput[kind]
        if "limited" not in lat:
            continue
        ok = errors_ok(lat["limited"]["errors"], lat["limited"]["requests"], targets)
        added, limited = lat["added_p50_ms"], lat["limited_added_p50_ms"]
        # A tenth of a sub-millisecond figure is within the noise: allow 0.05 ms besides.
        within = limited <= added * (1 + goal) + 0.05
        rows.append(Row(
            f"added p50, {label}: proxy key → access key, limits on (ms)", "", "",
            f"{added:+.3f} → {limited:+.3f}", f"{limited - added:+.3f}", f"≤ +{goal:.0%}",
            verdict(ok and within),
        ))  # fmt: skip
        ratio = t.get("limited_ratio")
        ok = errors_ok(t["limited"]["errors"], t["limited"]["requests"], targets)
        rows.append(Row(
            f"  req/s, {label}: proxy key → access key, limits on", "", "",
            f"{t['proxied']['rps']:,.0f} → {t['limited']['rps']:,.0f}",
            f"{ratio:.1%}" if ratio else "", f"≥ {1 - goal:.0%}",
            verdict(ok and ratio is not None and ratio >= 1 - goal),
        ))  # fmt: skip
    return rows


def rss_rows(rss: dict[str, Any], targets: Targets, plan: Plan) -> list[Row]:
    if not rss:
        return [Row("worker RSS", "", "", "skipped", "", "", "")]
    flat = (
        rss["growth_mib"] <= targets.rss_growth_mib
        and rss["requests"] >= plan.rss_requests
        and errors_ok(rss["errors"], rss["requests"], targets)
    )
    return [
        Row("worker RSS after warm-up / max (MiB)", "", "",
            f"{rss['after_warmup_mib']:.1f} / {rss['max_mib']:.1f}", "",
            f"≤ {targets.rss_mib:.0f}", verdict(rss["max_mib"] <= targets.rss_mib)),
        Row(f"worker RSS over {rss['requests']:,} more req (MiB)", "", "",
            f"{rss['start_mib']:.1f} → {rss['end_mib']:.1f}", f"{rss['growth_mib']:+.1f}",
            f"≤ +{targets.rss_growth_mib:.0f}", verdict(flat)),
    ]  # fmt: skip


def vs_reference(results: Results) -> dict[str, Any]:
    """gptload as a share of bench/reference.py: the figures the reference targets are on."""
    out: dict[str, Any] = {}
    for kind in ("plain", "stream"):
        lat, t = results.latency[kind], results.throughput[kind]
        out[kind] = {
            "rps_ratio": t["reference_ratio"],
            "reference_rps": t["reference"]["rps"],
            "gateway_rps": t["proxied"]["rps"],
            "reference_added_p50_ms": lat["reference_added_p50_ms"],
            "gateway_added_p50_ms": lat["added_p50_ms"],
            "added_over_reference_p50_ms": lat["added_over_reference_p50_ms"],
            "reference_cpu_ms_per_request": t["reference"]["server_cpu_ms_per_request"],
            "gateway_cpu_ms_per_request": t["proxied"]["server_cpu_ms_per_request"],
        }
    return out


def print_table(rows: list[Row]) -> None:
    headers = Row("scenario", "direct", "reference", "gptload", "added / ratio", "target", "result")
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
    parser.add_argument(
        "--group-config",
        default="",
        help="the bench group's setting overrides as JSON, e.g. '{\"key_rpm\": 1000000}'",
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
            world = set_up(processes, pinning, args.keys, EVENTS, args.group_config)
            say(f"upstream {world.upstream_url} (pid {world.upstream_pid}); gateway "
                f"{world.gateway.url} (pid {world.gateway.pid}, worker {world.gateway.worker_pids()}); "
                f"reference {world.reference.url} (pid {world.reference.pid})")  # fmt: skip
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
        "vs_reference": vs_reference(results),
        "results": asdict(results),
    }
    path = save(report, args.json)
    failed = [r.scenario.strip() for r in rows if r.verdict == "FAIL"]
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
        f"(worker pid {' '.join(map(str, world.gateway.worker_pids()))})  "
        f"reference {world.reference.url} (pid {world.reference.pid})\n"
        f"  proxy key {world.proxy_key}\n"
        f"  curl -s {world.gateway.url}/proxy/{GROUP}/v1/chat/completions "
        f"-H 'Authorization: Bearer {world.proxy_key}' -H 'Content-Type: application/json' "
        f"-d '{json.dumps(PLAIN_BODY)}'\n"
        f"  load: BENCH_BODY={world.tmp}/plain.json BENCH_KEY={world.proxy_key} "
        f"wrk -t1 -c32 -d10s -s {WRK_SCRIPT} {world.gateway.url}/proxy/{GROUP}/v1/chat/completions\n"
        f"  (the reference: the same with {world.reference.url}; it was started as "
        f"{sys.executable} {BENCH_DIR / 'reference.py'} --port {world.reference.url.rsplit(':', 1)[1]} "
        f"--upstream {world.upstream_url} --proxy-key {world.proxy_key} "
        f"--keys-file {world.reference.keys_file})\n"
        f"  gateway environment: {world.tmp}/gateway.env (cd {world.tmp} && "
        f"env $(cat gateway.env) {sys.executable} {ROOT}/manage.py serve)\n"
        f"  stop them: kill {pids}"
    )


if __name__ == "__main__":
    sys.exit(main())
