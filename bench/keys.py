"""gptload key-pool benchmark: import, list and clear 100,000 keys, in one command.

On a fresh SQLite database in a temporary directory (or a MySQL/MariaDB database it
creates and drops, with --database-dsn), Redis off, it measures against issue 4's targets:

  `manage.py import_keys` of 100,000 keys into one group          < 30 s
  the same file uploaded to POST /api/keys/add-async, until done   < 30 s (upload → done)
  GET /api/keys pages (first, middle, last, 1,000 per page, exact
  key search) at 100,000 keys, 20 requests each                  p95 < 200 ms
  POST /api/keys/clear-all-invalid of 50,000 invalid keys         one call, all gone

and issue 10's: the console's pages (dashboard, groups, the key list and the request log
list with its filters, a log row) at 100,000 keys in a group and 10,000,000 request log
rows (made by bench/seed_logs.py), signed in with the AUTH_KEY       p95 < 300 ms

and issue 11's, at 1,000,000 keys across groups (the rest copied by SQL) and 10 M log rows:
  every API list page, first and deep, by cursor (and by number,
  informational), the console's lists first and deep, the dashboard,
  a retention batch (and the dashboard while retention runs)       p95 < 300 ms
  the 16 MiB key file's upload: server and worker peak RSS          < 200 MiB
  a job's start on the embedded filesystem broker                   p95 < 0.2 s

The API runs under its production server (`manage.py serve`, one uvicorn worker) beside
one Celery worker (`celery -A gptload worker --pool=solo`) on the embedded filesystem
broker, as `make run` does without Redis.

  python bench/keys.py                                          SQLite, 1 M keys
  python bench/keys.py --keys 3000 --total-keys 10000 --logs 50000   a quick smoke run
  python bench/keys.py --database-dsn mysql://root@127.0.0.1:3306/gptload_bench
"""

from __future__ import annotations

import argparse
import html
import http.cookiejar
import json
import math
import os
import platform
import random
import re
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the project is not
    sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402 - needs the project root on the path first
    NOISE_LIMIT_CORES,
    CpuMeter,
    CpuReading,
    Processes,
    die,
    free_port,
    process_cpu_seconds,
    save,
    say,
    sigterm_as_interrupt,
    status_kib,
    tail,
    verdict,
    wait_until_up,
)

COMMAND_GROUP = "bench-command"  # imported with manage.py import_keys, then listed and cleared
API_GROUP = "bench-api"  # imported through POST /api/keys/add-async
WARMUP_GROUP = "bench-warmup"  # one small job first: proves the worker takes jobs
UPSTREAM = "http://127.0.0.1:9"  # never called: nothing here validates keys
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
GEMINI_ALPHABET = ALNUM + "-_"
GEMINI_SHARE = 0.2  # the rest are OpenAI-like
JOB_FIELDS = ("id", "status", "result", "processed", "total", "created_at", "started_at",
              "finished_at")  # fmt: skip
POLL_S = 0.1  # /api/tasks/status polling: the resolution of "upload → done"
# "Idle": under 0.05 core over 1.5 s, longer than the proxy's 1 s check of the configuration
# version. After every import the server rebuilds its proxy snapshot of all keys (a second
# or two at 100k keys, and requests take twice as long meanwhile).
IDLE_WINDOW_S = 1.5
IDLE_CORES = 0.05
MYSQL_SERVERS = ("mariadbd", "mysqld")
MYSQL_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
SETTINGS_MODULE = "bench_keys_settings"
SETTINGS_OVERLAY = '''"""gptload's settings with the Celery filesystem broker in this run's directory.

Written by bench/keys.py so that its worker never shares a queue with another
installation (with MySQL the project's settings put it under data/celery)."""

from pathlib import Path

from gptload.settings import *  # noqa: F403

CELERY_DATA_DIR = Path({folder!r})
CELERY_BROKER_TRANSPORT_OPTIONS = {{
    **CELERY_BROKER_TRANSPORT_OPTIONS,  # noqa: F405 - the polling interval among them
    "data_folder_in": str(CELERY_DATA_DIR / "queue"),
    "data_folder_out": str(CELERY_DATA_DIR / "queue"),
    "control_folder": str(CELERY_DATA_DIR / "control"),
}}
'''
MARK_INVALID = """
import json
from django.db import transaction
from django.utils import timezone
from keys.models import APIKey
rows = APIKey.objects.filter(group_id={group_id})
ids = list(rows.order_by("id").values_list("id", flat=True))[1::2]
now = timezone.now()
with transaction.atomic():
    for start in range(0, len(ids), 1000):
        APIKey.objects.filter(id__in=ids[start:start + 1000]).update(
            status="invalid", status_changed_at=now, last_error="bench: marked invalid")
print(json.dumps({{"invalid": rows.filter(status="invalid").count(), "total": rows.count()}}))
"""


@dataclass(frozen=True)
class Targets:
    command_import_s: float = 30.0
    api_import_s: float = 30.0
    page_p95_ms: float = 200.0
    # One call must also finish before a reverse proxy gives up on it (nginx: 60 s).
    clear_s: float = 60.0
    console_p95_ms: float = 300.0
    scale_p95_ms: float = 300.0  # issue 11: any list page, the dashboard, a retention batch
    upload_peak_mib: float = 200.0
    job_start_s: float = 0.2


# --- the key file --------------------------------------------------------------------------


def write_keys(path: Path, count: int, seed: int) -> list[str]:
    """`count` distinct random keys, one per line: OpenAI-like `sk-` + 48 characters, and
    a share of Gemini-like `AIza` + 35 (39 in all). Returns them in file order."""
    rng = random.Random(seed)
    keys: set[str] = set()
    ordered: list[str] = []
    while len(ordered) < count:
        if rng.random() < GEMINI_SHARE:
            key = "AIza" + "".join(rng.choices(GEMINI_ALPHABET, k=35))
        else:
            key = "sk-" + "".join(rng.choices(ALNUM, k=48))
        if key not in keys:
            keys.add(key)
            ordered.append(key)
    path.write_text("".join(f"{key}\n" for key in ordered))
    return ordered


# --- the database --------------------------------------------------------------------------


@dataclass
class Database:
    dsn: str
    vendor: str  # "sqlite" or "mysql"
    version: str
    mysql: dict[str, Any] = field(default_factory=dict)  # connection arguments, without db
    name: str = ""
    created: bool = False
    server_pids: list[int] = field(default_factory=list)  # a MySQL server on this machine

    def drop(self) -> None:
        if self.vendor != "mysql" or not self.created:
            return
        connection = mysql_connect(self.mysql)
        try:
            connection.cursor().execute(f"DROP DATABASE IF EXISTS `{self.name}`")
        finally:
            connection.close()
        self.created = False


def mysql_connect(arguments: dict[str, Any]) -> Any:
    import MySQLdb

    try:
        return MySQLdb.connect(**arguments)
    except MySQLdb.Error as exc:
        die(f"cannot connect to MySQL/MariaDB at {arguments.get('host')}: {exc}")


def prepare_database(dsn: str | None, tmp: Path, drop_existing: bool) -> Database:
    """A fresh SQLite file in `tmp`, or the MySQL database `dsn` names, created here."""
    if not dsn:
        path = tmp / "bench.db"
        return Database(f"sqlite:///{path}", "sqlite", f"SQLite {sqlite3.sqlite_version}")
    from gptload.lib.dsn import MYSQL_SCHEMES, parse_database
    from gptload.lib.env import ConfigError

    scheme = dsn.split("://", 1)[0].lower() if "://" in dsn else ""
    if scheme not in MYSQL_SCHEMES:
        die("--database-dsn takes a mysql:// (or mariadb://) DSN; leave it out for SQLite")
    try:
        config = parse_database(dsn, ROOT)
    except ConfigError as exc:
        die(f"--database-dsn: {exc}")
    name = str(config["NAME"])
    if not MYSQL_NAME.match(name):
        die(f"--database-dsn: use a plain database name (letters, digits, _), not {name!r}")
    arguments: dict[str, Any] = {"user": config.get("USER") or "root", "charset": "utf8mb4"}
    if config.get("PASSWORD"):
        arguments["password"] = config["PASSWORD"]
    if config["OPTIONS"].get("unix_socket"):
        arguments["unix_socket"] = config["OPTIONS"]["unix_socket"]
    else:
        arguments["host"] = config.get("HOST") or "127.0.0.1"
        arguments["port"] = int(config.get("PORT") or 3306)
    connection = mysql_connect(arguments)
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT VERSION()")
        row = cursor.fetchone()
        cursor.execute("SHOW DATABASES LIKE %s", (name,))
        if cursor.fetchone():
            if not drop_existing:
                die(f"the database {name!r} already exists: the benchmark creates and drops its "
                    "own. Choose another name, or pass --drop-existing to drop it first.")  # fmt: skip
            cursor.execute(f"DROP DATABASE `{name}`")
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    finally:
        connection.close()
    version = str(row[0]) if row else "?"
    vendor_name = "MariaDB" if "mariadb" in version.lower() else "MySQL"
    local = arguments.get("host", "localhost") in ("127.0.0.1", "localhost", "::1")
    return Database(dsn, "mysql", f"{vendor_name} {version}", arguments, name, created=True,
                    server_pids=mysql_server_pids() if local else [])  # fmt: skip


def mysql_server_pids() -> list[int]:
    """The MySQL/MariaDB server processes on this machine (their CPU works for the run)."""
    found = []
    for entry in Path("/proc").iterdir():
        with suppress(OSError):
            if entry.name.isdigit() and (entry / "comm").read_text().strip() in MYSQL_SERVERS:
                found.append(int(entry.name))
    return found


# --- the project's environment and commands ----------------------------------------------------


def project_env(
    tmp: Path, database: Database, port: int, auth_key: str, encrypt: bool
) -> dict[str, str]:
    """The environment of every project process of the run (commands, server, worker)."""
    celery = tmp / "celery"
    for folder in ("queue", "control"):
        (celery / folder).mkdir(parents=True, exist_ok=True)
    (tmp / f"{SETTINGS_MODULE}.py").write_text(SETTINGS_OVERLAY.format(folder=str(celery)))
    env = dict(os.environ)
    for name in ("LOG_ENABLE_FILE", "STATIC_ROOT", "ENCRYPTION_KEY"):
        env.pop(name, None)
    forced = {
        "DATABASE_DSN": database.dsn,
        "REDIS_DSN": "",  # set empty, so that a .env file cannot bring Redis in
        "AUTH_KEY": auth_key,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "IS_SLAVE": "false",
        "DJANGO_DEBUG": "false",
        "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
        "PYTHONPATH": f"{tmp}:{ROOT}",  # the overlay, then the project (cwd is tmp)
    }
    if encrypt:
        forced["ENCRYPTION_KEY"] = secrets.token_urlsafe(32)
    return {**env, **forced}


def manage(env: dict[str, str], tmp: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), *arguments], env=env,
                          cwd=tmp, capture_output=True, text=True, check=False)  # fmt: skip


def manage_checked(env: dict[str, str], tmp: Path, *arguments: str) -> str:
    out = manage(env, tmp, *arguments)
    if out.returncode != 0:
        die(f"manage.py {arguments[0]} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out.stdout


def create_group(env: dict[str, str], tmp: Path, name: str) -> int:
    out = manage_checked(env, tmp, "create_group", name, "--channel", "openai",
                         "--upstream", UPSTREAM, "--test-model", "gpt-4o-mini")  # fmt: skip
    found = re.search(r"\bid (\d+)\.", out)
    if not found:
        die(f"create_group printed no group id:\n{out}")
    return int(found.group(1))


# --- the management API ----------------------------------------------------------------------


@dataclass
class Api:
    url: str
    key: str
    log: Path

    def call(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: bytes | None = None,
        content_type: str = "",
        timeout: float = 60,
    ) -> tuple[int, Any, float]:
        """(status, decoded JSON, milliseconds to the last byte of the answer)."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        request = urllib.request.Request(url, data=body, method=method)  # noqa: S310 - loopback
        request.add_header("Authorization", f"Bearer {self.key}")
        if content_type:
            request.add_header("Content-Type", content_type)
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        elapsed_ms = (time.perf_counter() - started) * 1000
        try:
            return status, json.loads(raw) if raw else None, elapsed_ms
        except ValueError:
            return status, raw[:300], elapsed_ms

    def data(self, method: str, path: str, **kwargs: Any) -> Any:
        """The envelope's `data` of a successful call; stops the run otherwise."""
        status, answer, _ = self.call(method, path, **kwargs)
        if status != 200 or not isinstance(answer, dict) or answer.get("code") != 0:
            die(f"{method} {path} answered {status}: {str(answer)[:500]}\n{tail(self.log)}")
        return answer["data"]

    def post_json(self, path: str, payload: dict[str, Any], timeout: float = 60) -> Any:
        return self.data("POST", path, body=json.dumps(payload).encode(),
                         content_type="application/json", timeout=timeout)  # fmt: skip

    def count(self, group_id: int, status: str | None = None) -> int:
        """The group's keys (in `status`), counted exactly: the list counts 10,000 at most."""
        keys = self.data("GET", f"/api/groups/{group_id}/stats")["key_stats"]
        return int(keys[f"{status}_keys" if status else "total_keys"])


def multipart(group_id: int, filename: str, content: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with `group_id` and the file as `file`."""
    boundary = "gptload-bench-" + secrets.token_hex(12)
    body = b"".join([
        f'--{boundary}\r\nContent-Disposition: form-data; name="group_id"\r\n\r\n'
        f"{group_id}\r\n".encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: text/plain\r\n\r\n".encode(),
        content,
        f"\r\n--{boundary}--\r\n".encode(),
    ])  # fmt: skip
    return body, f"multipart/form-data; boundary={boundary}"


def wait_for_job(
    api: Api, group_id: int, job_id: int, timeout: float
) -> tuple[dict[str, Any], float]:
    """The job's final status and when (time.perf_counter) it was first seen finished."""
    deadline = time.monotonic() + timeout
    while True:
        status = api.data("GET", "/api/tasks/status", query={"group_id": group_id})
        if status["id"] == job_id and not status["is_running"]:
            return status, time.perf_counter()
        if time.monotonic() > deadline:
            die(f"job {job_id} is not done after {timeout:.0f} s ({status['status']}, "
                f"{status['processed']:,}/{status['total']:,}); is the worker running?\n"
                f"{tail(api.log.parent / 'worker.log')}")  # fmt: skip
        time.sleep(POLL_S)


def wait_idle(pid: int, timeout: float = 60) -> float:
    """Waits until the process is idle (or `timeout`); returns how long it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = process_cpu_seconds(pid)
        time.sleep(IDLE_WINDOW_S)
        if process_cpu_seconds(pid) - before < IDLE_CORES * IDLE_WINDOW_S:
            break
    return round(time.monotonic() - started, 2)


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


# --- the run -------------------------------------------------------------------------------------


@dataclass
class World:
    tmp: Path
    env: dict[str, str]
    database: Database
    keys: list[str]
    key_file: Path
    groups: dict[str, int] = field(default_factory=dict)
    server_pid: int = 0
    worker_pid: int = 0
    log_rows: int = 0
    retention_batch: int = 0
    cursors: dict[str, str] = field(default_factory=dict)  # deep positions, for the console


@dataclass
class Results:
    command_import: dict[str, Any] = field(default_factory=dict)
    api_import: dict[str, Any] = field(default_factory=dict)
    paging: dict[str, dict[str, Any]] = field(default_factory=dict)
    clear_invalid: dict[str, Any] = field(default_factory=dict)
    key_seed: dict[str, Any] = field(default_factory=dict)
    key_walk: dict[str, dict[str, Any]] = field(default_factory=dict)
    log_paging: dict[str, dict[str, Any]] = field(default_factory=dict)
    retention: dict[str, Any] = field(default_factory=dict)
    job_start: dict[str, Any] = field(default_factory=dict)
    log_seed: dict[str, Any] = field(default_factory=dict)
    console: dict[str, dict[str, Any]] = field(default_factory=dict)
    settle_s: float = 0.0  # waited after the API import, until the server was idle
    # VmRSS / VmHWM (peak so far) of the server and the worker after each step, in MiB.
    memory_mib: dict[str, dict[str, float]] = field(default_factory=dict)

    def sample_memory(self, step: str, world: World) -> None:
        self.memory_mib[step] = {
            f"{name}_{field_name.lower()}": round(status_kib(pid, field_name) / 1024, 1)
            for name, pid in (("server", world.server_pid), ("worker", world.worker_pid))
            for field_name in ("VmRSS", "VmHWM")
        }


class Phase:
    """Measures, around one timed step, the CPU that processes outside the benchmark took
    (the server, the worker, a local database server and finished commands are ours)."""

    def __init__(self, world: World) -> None:
        pids = [world.server_pid, world.worker_pid, *world.database.server_pids]
        self.meter = CpuMeter([pid for pid in pids if pid])
        self.before: CpuReading | None = None

    def __enter__(self) -> Phase:
        self.before = self.meter.read()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def other_cores(self) -> float:
        assert self.before is not None
        return round(self.meter.other_cores(self.before, self.meter.read()), 3)


def set_up(args: argparse.Namespace, database: Database, tmp: Path) -> World:
    port, auth_key = free_port(), secrets.token_urlsafe(32)
    env = project_env(tmp, database, port, auth_key, args.encrypt)
    key_file = tmp / "keys.txt"
    say(f"writing {args.keys:,} random keys to {key_file.name}...")
    keys = write_keys(key_file, args.keys, args.seed)
    world = World(tmp, env, database, keys, key_file)
    say(f"database: {database.version}; migrate and create_group...")
    manage_checked(env, tmp, "migrate", "--no-input", "-v0")
    for name in (COMMAND_GROUP, API_GROUP, WARMUP_GROUP):
        world.groups[name] = create_group(env, tmp, name)
    return world


def command_import(world: World, targets: Targets) -> dict[str, Any]:
    """`manage.py import_keys GROUP FILE`, timed from start to exit (Django's start included)."""
    say(
        f"manage.py import_keys {COMMAND_GROUP} {world.key_file.name} ({len(world.keys):,} keys)..."
    )
    with Phase(world) as phase:
        started = time.perf_counter()
        out = manage(world.env, world.tmp, "import_keys", COMMAND_GROUP, str(world.key_file))
        seconds = time.perf_counter() - started
    if out.returncode != 0 or "Added" not in out.stdout:
        die(f"import_keys failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    say(f"  {seconds:.2f} s: {out.stdout.strip()}")
    return {"seconds": round(seconds, 3), "keys_per_second": round(len(world.keys) / seconds),
            "output": out.stdout.strip(), "other_cpu_cores": phase.other_cores(),
            "target_s": targets.command_import_s}  # fmt: skip


def start_servers(world: World, processes: Processes) -> Api:
    """`manage.py serve` (one worker, no embedded Celery worker) and one Celery worker."""
    serve = [sys.executable, str(ROOT / "manage.py"), "serve", "--no-migrate"]
    if "--no-worker" in manage(world.env, world.tmp, "serve", "--help").stdout:
        serve.append("--no-worker")  # this run starts its own worker, below
    log = world.tmp / "server.log"
    server = processes.start("server", serve, log, world.env, world.tmp)
    worker_cmd = [sys.executable, "-m", "celery", "-A", "gptload", "worker", "--pool=solo",
                  "--concurrency=1", "-l", "warning", "--hostname=bench-keys@%h",
                  "--without-gossip", "--without-mingle"]  # fmt: skip
    worker = processes.start("worker", worker_cmd, world.tmp / "worker.log", world.env, world.tmp)
    url = f"http://127.0.0.1:{world.env['PORT']}"
    wait_until_up(url + "/health", server, log, 60)
    world.server_pid, world.worker_pid = server.pid, worker.pid
    api = Api(url, world.env["AUTH_KEY"], log)
    say(f"server {url} (pid {server.pid}), Celery worker pid {worker.pid}; a warm-up job...")
    # A small job first: the worker is consuming (its start is not timed) and jobs work.
    group_id = world.groups[WARMUP_GROUP]
    job = api.post_json("/api/keys/add-async", {"group_id": group_id,
                        "keys_text": "\n".join(world.keys[:10])})  # fmt: skip
    status, _ = wait_for_job(api, group_id, job["id"], 120)
    if status["status"] != "succeeded" or (status["result"] or {}).get("added_count") != 10:
        die(f"the warm-up job did not add its 10 keys: {status}\n{tail(world.tmp / 'worker.log')}")
    wait_idle(server.pid)
    return api


def api_import(world: World, api: Api, targets: Targets) -> dict[str, Any]:
    """The key file as multipart to /api/keys/add-async, polled until the job is done."""
    group_id = world.groups[API_GROUP]
    body, content_type = multipart(group_id, world.key_file.name, world.key_file.read_bytes())
    say(f"POST /api/keys/add-async ({len(body) / 2**20:.1f} MiB file, {len(world.keys):,} keys) "
        "until the job is done...")  # fmt: skip
    before = {name: reset_peak(pid) for name, pid in (("server", world.server_pid),
                                                      ("worker", world.worker_pid))}  # fmt: skip
    with Phase(world) as phase:
        started = time.perf_counter()
        status, answer, upload_ms = api.call("POST", "/api/keys/add-async", body=body,
                                             content_type=content_type, timeout=300)  # fmt: skip
        if status != 200 or not isinstance(answer, dict) or answer.get("code") != 0:
            die(f"add-async answered {status}: {str(answer)[:500]}\n{tail(api.log)}")
        job = answer["data"]
        server_peak = status_kib(world.server_pid, "VmHWM") / 1024  # the upload read and stored
        done, finished = wait_for_job(api, group_id, job["id"], max(600, targets.api_import_s * 10))
        seconds = finished - started
        worker_peak = status_kib(world.worker_pid, "VmHWM") / 1024  # the job
    result = done["result"] or {}
    if done["status"] != "succeeded" or result.get("added_count") != len(world.keys):
        die(f"the import job ended {done['status']}: {done['error'] or result}")
    say(f"  {seconds:.2f} s upload → done (answered in {upload_ms / 1000:.2f} s, job "
        f"{done['duration_seconds']:.2f} s)")  # fmt: skip
    return {
        "seconds": round(seconds, 3),
        "keys_per_second": round(len(world.keys) / seconds),
        "upload_bytes": len(body),
        "upload_answered_s": round(upload_ms / 1000, 3),
        "queued_s": seconds_between(done["created_at"], done["started_at"]),
        "job_s": done["duration_seconds"],
        "job": {k: done[k] for k in JOB_FIELDS},
        "poll_interval_s": POLL_S,
        "rss_before_mib": before,
        "server_peak_mib": round(server_peak, 1),
        "worker_peak_mib": round(worker_peak, 1),
        "target_peak_mib": targets.upload_peak_mib,
        "other_cpu_cores": phase.other_cores(),
        "target_s": targets.api_import_s,
    }


def reset_peak(pid: int) -> float:
    """Resets the process's peak RSS (VmHWM) to its RSS now (Linux: clear_refs 5); returns
    that RSS in MiB, so that the next peak read is the next step's own."""
    with suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return round(status_kib(pid, "VmRSS") / 1024, 1)


def command_job(api: Api, group_id: int) -> dict[str, Any]:
    """The job import_keys recorded (the API shows it like a worker's)."""
    status = api.data("GET", "/api/tasks/status", query={"group_id": group_id})
    return {"job_s": status["duration_seconds"], "result": status["result"],
            "status": status["status"]}  # fmt: skip


def percentile(samples: list[float], share: float) -> float:
    """Nearest-rank percentile: the smallest sample with `share` of them at or below it."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def summary(
    name: str, timings: list[float], phase: Phase, target_ms: float, **extra: Any
) -> dict[str, Any]:
    """One timed scenario's figures (printed as they come), its samples and its target."""
    out = {
        "p50_ms": round(statistics.median(timings), 2),
        "p95_ms": round(percentile(timings, 0.95), 2),
        "max_ms": round(max(timings), 2),
        "mean_ms": round(statistics.fmean(timings), 2),
        "requests": len(timings),
        **extra,
        "samples_ms": [round(t, 2) for t in timings],
        "other_cpu_cores": phase.other_cores(),
        "target_p95_ms": target_ms,
    }
    say(f"  {name}: p50 {out['p50_ms']:.1f} ms, p95 {out['p95_ms']:.1f} ms")
    return out


def paging(world: World, api: Api, requests: int, targets: Targets) -> dict[str, dict[str, Any]]:
    """GET /api/keys scenarios, each checked once (not timed), then timed `requests` times."""
    group_id, total = world.groups[COMMAND_GROUP], len(world.keys)
    pages = -(-total // 15)
    step = max(1, total // requests)
    searched = [world.keys[(i * step) % total] for i in range(requests)]
    scenarios: list[tuple[str, list[dict[str, Any]], int]] = [
        ("page 1, 15 per page", [{"page": 1, "page_size": 15}], min(15, total)),
        (f"middle page ({pages // 2 or 1:,}), 15 per page",
         [{"page": pages // 2 or 1, "page_size": 15}], min(15, total)),
        (f"last page ({pages:,}), 15 per page",
         [{"page": pages, "page_size": 15}], total - (pages - 1) * 15),
        ("page 1, 1,000 per page", [{"page": 1, "page_size": 1000}], min(1000, total)),
        ("exact key_value= search", [{"key_value": key} for key in searched], 1),
    ]  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    for name, queries, expected in scenarios:
        check = {"group_id": group_id, **queries[0]}
        data = api.data("GET", "/api/keys", query=check)
        items, count = data["items"], data["pagination"]["total_items"]
        wanted_key = queries[0].get("key_value")
        # Counted exactly up to 10,000 rows past the page's start: a lower bound beyond.
        counted = data["pagination"]["total_exact"] and count == total
        if (
            len(items) != expected
            or (not counted and not wanted_key and count < min(total, 10_000))
            or (wanted_key and items[0]["key_value"] != wanted_key)
        ):
            die(f"GET /api/keys {check}: {len(items)} items of {count} (want {expected} of "
                f"{total}): {str(data)[:300]}")  # fmt: skip
        timings: list[float] = []
        with Phase(world) as phase:
            for i in range(requests):
                query = {"group_id": group_id, **queries[i % len(queries)]}
                status, answer, ms = api.call("GET", "/api/keys", query=query)
                if status != 200 or not answer["data"]["items"]:
                    die(f"GET /api/keys {query} answered {status}: {str(answer)[:300]}")
                timings.append(ms)
        out[name] = summary(name, timings, phase, targets.page_p95_ms, items=expected)
    return out


def key_walk(world: World, api: Api, targets: Targets) -> dict[str, dict[str, Any]]:
    """The whole command group by cursor, 1,000 keys a page, every page timed: the cost of
    a page must not grow with its depth. Checks that each key came once."""
    group_id, total = world.groups[COMMAND_GROUP], len(world.keys)
    say(
        f"GET /api/keys by cursor: a walk of all {total:,} keys of {COMMAND_GROUP}, 1,000 a page..."
    )
    timings: list[float] = []
    seen: set[int] = set()
    cursor: str | None = ""
    cursors: list[str | None] = []
    with Phase(world) as phase:
        while cursor is not None:
            query = {"group_id": group_id, "page_size": 1000, "cursor": cursor}
            status, answer, ms = api.call("GET", "/api/keys", query=query)
            if status != 200:
                die(f"GET /api/keys {query} answered {status}: {str(answer)[:300]}")
            timings.append(ms)
            seen.update(item["id"] for item in answer["data"]["items"])
            cursor = answer["data"]["pagination"]["next_cursor"]
            cursors.append(cursor)
    world.cursors["keys_deep"] = cursors[len(cursors) * 9 // 10 - 1] or ""  # for the console
    if len(seen) != total:
        die(f"the cursor walk saw {len(seen):,} distinct keys of {total:,}")
    tail_pages = timings[-max(1, len(timings) // 5) :]
    return {
        f"by cursor, every page of {len(timings)} (1,000 a page)":
            summary("by cursor, every page", timings, phase, targets.scale_p95_ms),
        f"by cursor, the deepest {len(tail_pages)} pages":
            summary("by cursor, deepest pages", tail_pages, phase, targets.scale_p95_ms),
    }  # fmt: skip


def log_paging(
    world: World, api: Api, requests: int, targets: Targets
) -> dict[str, dict[str, Any]]:
    """GET /api/logs at 10 M rows: the first page, a page 5 M rows deep by number (an offset:
    informational, it grows with the depth) and by cursor from there."""
    rows = world.log_rows
    deep_page = max(2, rows // 2 // 100)
    say(
        f"GET /api/logs at {rows:,} rows: first page, page {deep_page:,} by number and by cursor..."
    )
    out: dict[str, dict[str, Any]] = {}
    for name, query, count, target in (
        ("page 1, 100 a page", {"page": 1, "page_size": 100}, requests, targets.scale_p95_ms),
        ("first page by cursor, 100 a page", {"cursor": "", "page_size": 100}, requests,
         targets.scale_p95_ms),
        (f"page {deep_page:,} by number (offset {deep_page * 100:,}), 100 a page",
         {"page": deep_page, "page_size": 100}, 3, 0.0),
    ):  # fmt: skip
        timings = []
        with Phase(world) as phase:
            for _ in range(count):
                status, answer, ms = api.call("GET", "/api/logs", query=query, timeout=600)
                if status != 200 or len(answer["data"]["items"]) != 100:
                    die(f"GET /api/logs {query} answered {status}: {str(answer)[:300]}")
                timings.append(ms)
                world.cursors["logs_deep"] = answer["data"]["pagination"]["next_cursor"] or ""
        out[name] = summary(f"logs {name}", timings, phase, target)
    timings, cursor = [], world.cursors["logs_deep"]
    with Phase(world) as phase:
        for _ in range(requests):  # a walk onwards from half the table
            query = {"cursor": cursor, "page_size": 100}
            status, answer, ms = api.call("GET", "/api/logs", query=query)
            if status != 200 or len(answer["data"]["items"]) != 100:
                die(f"GET /api/logs by cursor answered {status}: {str(answer)[:300]}")
            timings.append(ms)
            cursor = answer["data"]["pagination"]["next_cursor"]
    out[f"by cursor, {deep_page * 100:,} rows deep, 100 a page"] = summary(
        "logs by cursor, deep", timings, phase, targets.scale_p95_ms
    )
    return out


SEED_KEYS = """
import json
from django.db import connection, transaction
from django.utils import timezone
from keys.models import APIKey, Group, KeyTally
source = {source}
made = []
for n in range({groups}):
    group = Group.objects.create(name=f"bench-bulk-{{n}}", channel_type="openai",
        test_model="gpt-4o-mini", upstreams=[{{"url": "{upstream}", "weight": 1}}])
    made.append(group.pk)
    table = APIKey._meta.db_table
    columns = [f.column for f in APIKey._meta.concrete_fields if f.column not in ("id", "group_id")]
    names = ", ".join(columns)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {{table}} (group_id, {{names}}) SELECT %s, {{names}} "
                       f"FROM {{table}} WHERE group_id = %s LIMIT %s", [group.pk, source, {per_group}])
# A key in ten has been used, at some time of the last day (the rest never: NULL, last).
used = ("NOW() - INTERVAL (id MOD 86400) SECOND" if connection.vendor == "mysql"
        else "datetime('now', '-' || (id % 86400) || ' seconds')")
with transaction.atomic(), connection.cursor() as cursor:
    cursor.execute(f"UPDATE {{APIKey._meta.db_table}} SET last_used_at = {{used}} WHERE id % 10 = 0")
KeyTally.objects.recount(made)  # keys copied by SQL, behind the tally's back
print(json.dumps({{"groups": made, "keys": APIKey.objects.count()}}))
"""


def seed_keys(world: World, total: int) -> dict[str, Any]:
    """More groups, filled by the database with copies of the command group's keys (each
    group its own), until `total` keys in all; a key in ten marked used (bulk SQL)."""
    have = len(world.keys) * 2 + 10
    missing = max(0, total - have)
    groups = -(-missing // len(world.keys)) if missing else 0
    say(f"seeding {missing:,} more keys in {groups} groups by SQL (to {total:,} in all)...")
    started = time.perf_counter()
    script = SEED_KEYS.format(source=world.groups[COMMAND_GROUP], groups=groups,
                              per_group=-(-missing // groups) if groups else 0, upstream=UPSTREAM)  # fmt: skip
    seeded = json.loads(
        manage_checked(world.env, world.tmp, "shell", "-c", script).splitlines()[-1]
    )
    seeded["seconds"] = round(time.perf_counter() - started, 1)
    say(f"  {seeded['keys']:,} keys in all, {seeded['seconds']:.0f} s")
    return seeded


RETENTION = """
import json, time
from datetime import timedelta
from django.utils import timezone
from logs import retention
from logs.models import RequestLog
cutoff = timezone.now() - timedelta(days={days})
out, size = [], retention.BATCH
for _ in range({batches}):
    began = time.perf_counter()
    rows = retention.delete_batch(RequestLog, "timestamp", cutoff, size)
    took = time.perf_counter() - began
    out.append([round(took * 1000, 2), rows])
    if rows < size:
        break
    size = retention.next_size(size, max(took, 0.001))  # as retention.delete_before does
print(json.dumps(out))
"""


def retention_batches(world: World, api: Api, batches: int, targets: Targets) -> dict[str, Any]:
    """`batches` retention batches on the oldest seeded rows, each timed inside the
    worker's code path (logs.retention.delete_batch), while the dashboard is timed beside
    them as an operator would load it."""
    import threading

    console = Console(api.url, world.env["AUTH_KEY"], api.log)
    say(f"retention: up to {batches} batches of the oldest rows, the dashboard loaded beside...")
    dashboard: list[float] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            status, _, ms = console.get("/admin/")
            if status == 200:
                dashboard.append(ms)
            stop.wait(0.2)

    loader = threading.Thread(target=load, daemon=True)
    with Phase(world) as phase:
        loader.start()
        out = manage_checked(world.env, world.tmp, "shell", "-c",
                             RETENTION.format(days=6.5, batches=batches))  # fmt: skip
        stop.set()
        loader.join()
    done = json.loads(out.strip().splitlines()[-1])
    timings, rows = [ms for ms, _ in done], sum(n for _, n in done)
    result = summary("retention batch", timings, phase, targets.scale_p95_ms, rows_deleted=rows)
    result["dashboard"] = summary("dashboard during retention", dashboard or [0.0], phase,
                                  targets.scale_p95_ms)  # fmt: skip
    return result


def job_starts(world: World, api: Api, count: int, targets: Targets) -> dict[str, Any]:
    """`count` one-key imports one after another: from the job's row (the request) to the
    worker's start of it, on the embedded filesystem broker."""
    group_id = world.groups[WARMUP_GROUP]
    say(f"{count} small jobs: request → worker start on the filesystem broker...")
    waits = []
    with Phase(world) as phase:
        for n in range(count):
            job = api.post_json("/api/keys/add-async", {"group_id": group_id,
                                "keys_text": f"sk-start-{n:04d}-{secrets.token_hex(16)}"})  # fmt: skip
            done, _ = wait_for_job(api, group_id, job["id"], 60)
            waits.append(1000 * (seconds_between(done["created_at"], done["started_at"]) or 0))
            time.sleep(random.random() * 0.3)  # land anywhere in the worker's polling cycle
    return summary("job start", waits, phase, targets.job_start_s * 1000)


# --- the console ------------------------------------------------------------------------------


class Console:
    """A browser's requests to the console: signed in with the AUTH_KEY, cookies kept."""

    def __init__(self, url: str, auth_key: str, log: Path) -> None:
        self.url, self.log = url, log
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )
        page = self.get("/admin/login/")[1]
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        if not token:
            die(f"the console's sign-in page has no CSRF token:\n{page[:300]}")
        form = urllib.parse.urlencode({"csrfmiddlewaretoken": token.group(1), "username": "",
                                       "password": auth_key, "next": "/admin/"}).encode()  # fmt: skip
        status, page, _ = self.get("/admin/login/", form)
        if status != 200 or 'id="dashboard"' not in page:
            die(f"signing in to the console with the AUTH_KEY failed ({status})\n{tail(log)}")

    def get(self, path: str, form: bytes | None = None) -> tuple[int, str, float]:
        """(status, page, milliseconds to its last byte); redirects followed."""
        request = urllib.request.Request(self.url + path, data=form)  # noqa: S310 - loopback
        started = time.perf_counter()
        try:
            with self.opener.open(request, timeout=120) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        return status, raw.decode(errors="replace"), (time.perf_counter() - started) * 1000


def seed_logs(world: World, rows: int) -> dict[str, Any]:
    """`rows` request log rows over the last 7 days, naming 1,000 of the command group's
    keys, and their hourly rollups (bench/seed_logs.py; not timed against a target)."""
    say(f"seeding {rows:,} request log rows and their hourly rollups (bench/seed_logs.py)...")
    groups = [f"{world.groups[name]}:{name}" for name in (COMMAND_GROUP, API_GROUP)]
    # As a module: run as a script, bench/ would come first on the path, and bench/keys.py
    # would hide the project's `keys` app.
    command = [sys.executable, "-m", "bench.seed_logs", "--rows", str(rows),
               "--keys-file", str(world.key_file), *(f"--group={g}" for g in groups)]  # fmt: skip
    started = time.perf_counter()
    out = subprocess.run(command, env=world.env, cwd=world.tmp, capture_output=True, text=True,
                         check=False)  # fmt: skip
    if out.returncode != 0:
        die(f"seed_logs.py failed ({out.returncode}):\n{out.stdout}{out.stderr[-3000:]}")
    seeded = json.loads(out.stdout.strip().splitlines()[-1])
    say(f"  {seeded['rows']:,} rows, {seeded['hourly_rows']:,} hourly rollups in "
        f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    return seeded


def console_pages(
    world: World, api: Api, requests: int, targets: Targets
) -> dict[str, dict[str, Any]]:
    """The console's pages an operator opens all day, each checked once, then timed."""
    console = Console(api.url, world.env["AUTH_KEY"], api.log)
    group_id = world.groups[COMMAND_GROUP]
    keys = world.keys[:1000]  # the keys the seeded log rows name
    step = max(1, len(keys) // requests)
    wanted = [keys[(i * step) % len(keys)] for i in range(requests)]
    found = [world.keys[(i * 7919) % len(world.keys)] for i in range(requests)]
    two_days_ago = datetime.now() - timedelta(days=2)
    hour = {"timestamp_from_0": two_days_ago.strftime("%Y-%m-%d"), "timestamp_from_1": "10:00:00",
            "timestamp_to_0": two_days_ago.strftime("%Y-%m-%d"), "timestamp_to_1": "11:00:00"}  # fmt: skip
    first = console.get("/admin/logs/requestlog/")[1]
    row_ids = re.findall(r"/admin/logs/requestlog/([0-9a-f-]{32,36})/change/", first)
    if not row_ids:
        die("the log list shows no rows after seeding")
    keys_url, logs_url = (
        f"/admin/keys/apikey/?group__id__exact={group_id}",
        "/admin/logs/requestlog/",
    )
    q = urllib.parse.urlencode
    deep = max(1, min(1000, len(world.keys) // 50 // 2))  # a page well inside the group (50 a page)
    scenarios: list[tuple[str, list[str], str]] = [
        ("dashboard, 24 h", ["/admin/"], 'id="dashboard"'),
        ("dashboard, 30 d, one group", [f"/admin/?span=30d&group={group_id}"], 'id="dashboard"'),
        ("group list", ["/admin/keys/group/"], COMMAND_GROUP),
        (f"key list, {len(world.keys):,}-key group, page 1", [keys_url], 'id="result_list"'),
        (f"key list, page {deep:,} by number", [keys_url + f"&p={deep}"], 'id="result_list"'),
        (f"key list, {len(world.keys) * 9 // 10:,} keys deep by its next link",
         [keys_url + "&" + q({"p": len(world.keys) * 9 // 10 // 50, "after": world.cursors["keys_deep"]})],
         'id="result_list"'),
        ("key list of every group, page 1", ["/admin/keys/apikey/"], 'id="result_list"'),
        ("key list of every group, deep by its next link",
         ["/admin/keys/apikey/?" + q({"p": 20000, "after": world.cursors["keys_deep"]})],
         'id="result_list"'),
        ("key list, whole-key search", ["/admin/keys/apikey/?" + q({"q": k}) for k in found],
         'id="result_list"'),
        ("log list, page 1", [logs_url], 'id="result_list"'),
        ("log list, page 200 by number", [logs_url + "?p=200"], 'id="result_list"'),
        (f"log list, {world.log_rows // 2:,} rows deep by its next link",
         [logs_url + "?" + q({"p": world.log_rows // 2 // 50, "after": world.cursors["logs_deep"]})],
         'id="result_list"'),
        ("log list, one group", [logs_url + "?" + q({"group": group_id})], 'id="result_list"'),
        ("log list, status 429", [logs_url + "?status=429"], 'id="result_list"'),
        ("log list, one key", [logs_url + "?" + q({"key": k}) for k in wanted], 'id="result_list"'),
        ("log list, one hour 2 days ago", [logs_url + "?" + q(hour)], 'id="result_list"'),
        ("log list, error text", [logs_url + "?" + q({"error": "broke off"})], 'id="result_list"'),
        ("log row page", [f"{logs_url}{row}/change/" for row in row_ids], "/proxy/"),
    ]  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    for name, paths, expected in scenarios:
        status, page, _ = console.get(paths[0])
        if status != 200 or expected not in page:
            die(f"console {paths[0]} answered {status} without {expected!r}: "
                f"{html.unescape(re.sub(r'<[^>]+>', ' ', page))[:300]}\n{tail(api.log)}")  # fmt: skip
        timings: list[float] = []
        with Phase(world) as phase:
            for i in range(requests):
                status, _, ms = console.get(paths[i % len(paths)])
                if status != 200:
                    die(f"console {paths[i % len(paths)]} answered {status}\n{tail(api.log)}")
                timings.append(ms)
        out[name] = summary(name, timings, phase, targets.console_p95_ms)
    return out


def clear_invalid(world: World, api: Api, targets: Targets) -> dict[str, Any]:
    """Every other key of the command group marked invalid (not timed), then one
    POST /api/keys/clear-all-invalid, timed, and the counts checked."""
    group_id, total = world.groups[COMMAND_GROUP], len(world.keys)
    marked = json.loads(manage_checked(world.env, world.tmp, "shell", "-c",
                                       MARK_INVALID.format(group_id=group_id)).splitlines()[-1])  # fmt: skip
    invalid = total // 2
    if marked != {"invalid": invalid, "total": total}:
        die(f"marking {invalid:,} keys invalid left {marked}")
    say(f"POST /api/keys/clear-all-invalid ({invalid:,} invalid of {total:,} keys)...")
    with Phase(world) as phase:
        status, answer, ms = api.call("POST", "/api/keys/clear-all-invalid",
                                      body=json.dumps({"group_id": group_id}).encode(),
                                      content_type="application/json", timeout=600)  # fmt: skip
    if status != 200 or not isinstance(answer, dict) or answer.get("code") != 0:
        die(f"clear-all-invalid answered {status}: {str(answer)[:500]}\n{tail(api.log)}")
    deleted = answer["data"]["deleted_count"]
    left, left_invalid = api.count(group_id), api.count(group_id, "invalid")
    say(f"  {ms / 1000:.2f} s: {deleted:,} deleted; {left:,} keys left, {left_invalid} invalid")
    return {
        "seconds": round(ms / 1000, 3),
        "calls": 1,
        "invalid_before": invalid,
        "deleted_count": deleted,
        "keys_left": left,
        "invalid_left": left_invalid,
        "ok": deleted == invalid and left == total - invalid and left_invalid == 0,
        "other_cpu_cores": phase.other_cores(),
        "target_s": targets.clear_s,
    }


def measure(
    world: World, processes: Processes, args: argparse.Namespace, targets: Targets
) -> Results:
    results = Results()
    api = start_servers(world, processes)
    results.sample_memory("started", world)
    # The upload first, so that the server's peak is the upload's own: every key the server
    # holds is also in its proxy snapshot (about 0.75 KiB each, 250 MiB at 340,000 keys).
    results.api_import = api_import(world, api, targets)
    results.sample_memory("add-async", world)
    results.settle_s = wait_idle(world.server_pid)
    say(f"server idle after {results.settle_s:.1f} s (it rebuilds its proxy snapshot of all keys)")
    results.command_import = command_import(world, targets)
    results.command_import.update(command_job(api, world.groups[COMMAND_GROUP]))
    if api.count(world.groups[COMMAND_GROUP]) != len(world.keys):
        die(f"{COMMAND_GROUP} does not hold the {len(world.keys):,} imported keys")
    wait_idle(world.server_pid)
    say(f"GET /api/keys at {len(world.keys):,} keys, {args.requests} requests per scenario...")
    results.paging = paging(world, api, args.requests, targets)
    results.key_walk = key_walk(world, api, targets)
    results.sample_memory("list", world)
    results.job_start = job_starts(world, api, args.requests, targets)
    if args.total_keys:
        results.key_seed = seed_keys(world, args.total_keys)
    if args.logs:
        results.log_seed = seed_logs(world, args.logs)
        world.log_rows = args.logs
        wait_idle(world.server_pid)
        results.log_paging = log_paging(world, api, args.requests, targets)
        say(f"the console at {len(world.keys):,} keys and {args.logs:,} log rows, "
            f"{args.requests} requests per page...")  # fmt: skip
        results.console = console_pages(world, api, args.requests, targets)
        results.sample_memory("console", world)
        results.retention = retention_batches(world, api, args.retention_batches, targets)
    results.clear_invalid = clear_invalid(world, api, targets)
    results.sample_memory("clear-all-invalid", world)
    return results


# --- report ----------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    measured: str
    target: str
    verdict: str  # PASS, FAIL or "" (informational)


def build_rows(results: Results, targets: Targets, keys: int) -> list[Row]:
    half = keys // 2
    command, api, clear = results.command_import, results.api_import, results.clear_invalid
    rows = [
        Row(f"import_keys command, {keys:,} keys (s)",
            f"{command['seconds']:.2f} ({command['keys_per_second']:,} keys/s)",
            f"< {targets.command_import_s:.0f}",
            verdict(command["seconds"] < targets.command_import_s)),
        Row("  of which the job (s)", f"{command['job_s']:.2f}", "", ""),
        Row(f"add-async upload → done, {keys:,} keys (s)",
            f"{api['seconds']:.2f} ({api['keys_per_second']:,} keys/s)",
            f"< {targets.api_import_s:.0f}", verdict(api["seconds"] < targets.api_import_s)),
        Row("  upload answered / queued / job (s)",
            f"{api['upload_answered_s']:.2f} / {api['queued_s'] or 0:.2f} / {api['job_s']:.2f}",
            "", ""),
    ]  # fmt: skip
    for name, page in results.paging.items():
        rows.append(Row(
            f"GET /api/keys {name}, p50 / p95 (ms)", f"{page['p50_ms']:.1f} / {page['p95_ms']:.1f}",
            f"p95 < {targets.page_p95_ms:.0f}", verdict(page["p95_ms"] < targets.page_p95_ms),
        ))  # fmt: skip
    rows.append(Row(
        f"clear-all-invalid, {half:,} of {keys:,} keys (s)",
        f"{clear['seconds']:.2f}, 1 call, {clear['deleted_count']:,} gone",
        f"1 call, all gone, < {targets.clear_s:.0f}",
        verdict(clear["ok"] and clear["seconds"] < targets.clear_s),
    ))  # fmt: skip
    for name, page in results.console.items():
        rows.append(Row(
            f"console: {name}, p50 / p95 (ms)", f"{page['p50_ms']:.1f} / {page['p95_ms']:.1f}",
            f"p95 < {targets.console_p95_ms:.0f}", verdict(page["p95_ms"] < targets.console_p95_ms),
        ))  # fmt: skip
    for name, page in results.key_walk.items():
        rows.append(scale_row(f"GET /api/keys {name}", page, targets))
    for name, page in results.log_paging.items():
        rows.append(scale_row(f"GET /api/logs {name}", page, targets))
    if results.retention:
        batch = results.retention
        rows.append(scale_row(f"retention batch ({batch['rows_deleted'] // batch['requests']:,} "
                              "rows)", batch, targets))  # fmt: skip
        rows.append(scale_row("  dashboard while retention runs", batch["dashboard"], targets))
    start = results.job_start
    rows.append(Row("job start on the filesystem broker, p50 / p95 (ms)",
                    f"{start['p50_ms']:.0f} / {start['p95_ms']:.0f}",
                    f"p95 < {targets.job_start_s * 1000:.0f}",
                    verdict(start["p95_ms"] < targets.job_start_s * 1000)))  # fmt: skip
    peak = max(api["server_peak_mib"], api["worker_peak_mib"])
    rows.append(Row(f"upload of {api['upload_bytes'] / 2**20:.1f} MiB: server / worker peak RSS (MiB)",
                    f"{api['server_peak_mib']:.0f} / {api['worker_peak_mib']:.0f}",
                    f"< {targets.upload_peak_mib:.0f}", verdict(peak < targets.upload_peak_mib)))  # fmt: skip
    memory = results.memory_mib["clear-all-invalid"]
    rows.append(Row("server / worker peak RSS (MiB)",
                    f"{memory['server_vmhwm']:.1f} / {memory['worker_vmhwm']:.1f}", "", ""))  # fmt: skip
    return rows


def scale_row(name: str, page: dict[str, Any], targets: Targets) -> Row:
    target = page["target_p95_ms"]
    return Row(f"{name}, p50 / p95 (ms)", f"{page['p50_ms']:.1f} / {page['p95_ms']:.1f}",
               f"p95 < {target:.0f}" if target else "",
               verdict(page["p95_ms"] < target) if target else "")  # fmt: skip


def print_table(rows: list[Row]) -> None:
    table = [Row("scenario", "measured", "target", "result"), *rows]
    names = list(Row.__dataclass_fields__)
    widths = [max(len(getattr(r, f)) for r in table) for f in names]
    for i, row in enumerate(table):
        cells = [getattr(row, f) for f in names]
        say("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                      for j, (c, w) in enumerate(zip(cells, widths, strict=True))))  # fmt: skip
        if i == 0:
            say("  ".join("-" * w for w in widths))


def other_cpu(results: Results) -> list[tuple[str, float]]:
    phases = [("import_keys", results.command_import), ("add-async", results.api_import),
              ("clear-all-invalid", results.clear_invalid),
              *((f"list {name}", page) for name, page in results.paging.items()),
              *((f"keys {name}", page) for name, page in results.key_walk.items()),
              *((f"logs {name}", page) for name, page in results.log_paging.items()),
              *((f"console {name}", page) for name, page in results.console.items())]  # fmt: skip
    return [(name, float(phase["other_cpu_cores"])) for name, phase in phases]


def environment(world: World, args: argparse.Namespace) -> dict[str, Any]:
    cpu = "?"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    from importlib.metadata import version

    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": commit or None,
        "python": platform.python_version(),
        "django": version("django"),
        "celery": version("celery"),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "database": world.database.version,
        "encrypted": args.encrypt,
        "keys": args.keys,
        "log_rows": args.logs,
        "key_file_bytes": world.key_file.stat().st_size,
        "web_workers": 1,
        "celery_worker": "--pool=solo, filesystem broker",
    }


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/keys.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--keys",
        type=int,
        default=340_000,
        help="keys in the file imported into each group (default %(default)s: a 16 MiB file)",
    )
    parser.add_argument(
        "--total-keys",
        type=int,
        default=1_000_000,
        help="keys in all, the rest copied by SQL into more groups (default %(default)s; 0: none)",
    )
    parser.add_argument(
        "--retention-batches",
        type=int,
        default=100,
        help="retention batches timed on the oldest seeded log rows (default %(default)s)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=20,
        help="timed requests per GET /api/keys scenario (default %(default)s)",
    )
    parser.add_argument(
        "--logs",
        type=int,
        default=10_000_000,
        help="request log rows seeded for the console's pages (default %(default)s; 0: "
        "leave the console out)",
    )
    parser.add_argument(
        "--database-dsn",
        metavar="DSN",
        help="run on this MySQL/MariaDB database (mysql://user:pass@host:port/"
        "name), created and dropped here; default: a temporary SQLite file",
    )
    parser.add_argument(
        "--drop-existing",
        action="store_true",
        help="with --database-dsn: drop the database first if it exists",
    )
    parser.add_argument(
        "--encrypt",
        action="store_true",
        help="set a random ENCRYPTION_KEY (keys stored with AES-256-GCM)",
    )
    parser.add_argument("--seed", type=int, default=4, help="random seed of the key file")
    parser.add_argument(
        "--json",
        type=Path,
        help="write the results here (default bench/results/keys-<time>.json and keys-latest.json)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.keys < 30:
        parser.error("--keys: at least 30 (two pages, and keys to search)")
    if args.requests < 1:
        parser.error("--requests: at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale = max(1.0, args.keys / 100_000)  # issue 4's import targets are for 100,000 keys
    targets = Targets(command_import_s=30.0 * scale, api_import_s=30.0 * scale)
    processes = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="gptload-bench-keys-"))
    world: World | None = None
    database: Database | None = None
    finished = interrupted = False
    say(f"gptload key-pool bench: {args.keys:,} keys, "
        f"{'MySQL/MariaDB' if args.database_dsn else 'SQLite'}, Redis off")  # fmt: skip
    idle = CpuMeter([])
    before = idle.read()
    time.sleep(1)
    if (busy := idle.other_cores(before, idle.read())) > NOISE_LIMIT_CORES:
        say(f"note: other processes are using {busy:.2f} cores right now; results will suffer")
    try:
        with sigterm_as_interrupt():
            say(f"work dir: {tmp}")
            database = prepare_database(args.database_dsn, tmp, args.drop_existing)
            world = set_up(args, database, tmp)
            results = measure(world, processes, args, targets)
            rows = build_rows(results, targets, args.keys)
            about = environment(world, args)
            finished = True
    except KeyboardInterrupt:
        say("\ninterrupted: stopping the processes (the worker ends its job first)...")
        interrupted = True
        return 130
    finally:
        processes.stop_all()
        if database is not None:
            database.drop()
        if finished or interrupted or not (tmp / "server.log").exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            say(f"logs kept in {tmp} (server.log, worker.log)")
    say()
    print_table(rows)
    report = {
        "environment": about,
        "targets": asdict(targets),
        "groups": world.groups,
        "table": [asdict(r) for r in rows],
        "results": asdict(results),
    }
    path = save(report, args.json, prefix="keys", latest="keys-latest.json")
    say()
    say(f"one web worker, one Celery worker (solo pool); {world.database.version}; "
        f"keys {'encrypted' if args.encrypt else 'stored as they are'}.")  # fmt: skip
    say(f"results: {path}")
    steps = other_cpu(results)
    noisy = [(name, cores) for name, cores in steps if cores > NOISE_LIMIT_CORES]
    if noisy:
        worst, cores = max(noisy, key=lambda step: step[1])
        say(f"WARNING: other processes used more than {NOISE_LIMIT_CORES} core during "
            f"{len(noisy)} of {len(steps)} timed steps (up to {cores:.2f} cores, in {worst}): "
            "the machine was not quiet, so these figures understate gptload.")  # fmt: skip
    failed = [r.scenario for r in rows if r.verdict == "FAIL"]
    if failed:
        say(f"missed: {'; '.join(failed)}")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
