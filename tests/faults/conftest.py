"""The fault suite's world: gptload as `manage.py serve` runs it, in a process of its own,
in front of the fake provider (`tests/fakeprovider.py`), driven through its management
API as an operator's script would; and private Redis and MariaDB servers to stop and
start (never the machine's shared ones, which other test runs use at the same time).

Everything started here dies with the test run, even when it is killed: the servers
through `gptload.lib.lifeline`, redis-server and mariadbd through the kernel's
parent-death signal, asked for between fork and exec.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from conftest import ADMIN_KEY, ROOT, Server, free_port, manage
from gptload.lib import lifeline
from proxy.tests.conftest import PROXY_KEY
from tests.fakeprovider import FakeProvider

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# The gateway's own cap on proxied calls in flight: a slot that a vanished client never
# gave back shows as a 429 when this many calls are held open at once.
MAX_CONCURRENT = 24
PR_SET_PDEATHSIG = 1
MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"


def eventually(check: Callable[[], Any], seconds: float = 15, step: float = 0.1) -> Any:
    """`check()`'s first true value within `seconds` (a bound on "does not hang", not a
    speed test), else its last one."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


class Served(Server):
    """A gptload server whose output goes to a file, not a pipe: a long-lived server's
    warnings (each fault logs one) would otherwise fill the pipe and stall it. Its
    database is migrated already (`store_env`, or a copy of it): it starts without
    looking at the migrations."""

    def __init__(self, env: dict[str, str], log: Path, *extra: str) -> None:
        port = free_port()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._sink: BinaryIO = log.open("wb")
        command = [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port",
                   str(port), "--no-worker", "--no-migrate", *extra]  # fmt: skip
        self.process = subprocess.Popen(  # type: ignore[assignment]
            command, env=lifeline.child_env(env), cwd=ROOT, stdout=self._sink,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        super().stop()
        self._sink.close()


class Gateway:
    """A served gptload and the fake provider behind it, with the operator's API calls
    the fault tests make: groups with their keys and config, key states, log rows."""

    def __init__(self, server: Served, fake: FakeProvider) -> None:
        self.server, self.fake, self.url = server, fake, server.url
        self.group_ids: dict[str, int] = {}

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(method, f"{self.url}/api{path}", headers=ADMIN, timeout=30,
                                 **kwargs)  # fmt: skip
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def group(self, keys: Sequence[str], channel: str = "openai", **config: Any) -> str:
        """A new group of `keys` (in this order: the first is tried first) on the fake."""
        name = f"f{uuid.uuid4().hex[:12]}"
        group = self.api("POST", "/groups", json={
            "name": name, "channel_type": channel, "test_model": "m", "proxy_keys": PROXY_KEY,
            "upstreams": [{"url": self.fake.url, "weight": 1}], "config": config})  # fmt: skip
        self.group_ids[name] = group["id"]
        self.api("POST", "/keys/add-multiple",
                 json={"group_id": group["id"], "keys_text": "\n".join(keys)})  # fmt: skip
        return name

    def proxy(self, group: str) -> str:
        return f"{self.url}/proxy/{group}"

    def keys(self, group: str) -> dict[str, dict[str, Any]]:
        """The group's keys as /api/keys shows them, by their value."""
        page = self.api("GET", "/keys", params={"group_id": self.group_ids[group],
                                                "page_size": 100})  # fmt: skip
        return {key["key_value"]: key for key in page["items"]}

    def logs(self, group: str) -> list[dict[str, Any]]:
        """The group's log rows as /api/logs shows them, oldest first."""
        rows: list[dict[str, Any]] = []
        page = 1
        while True:
            found = self.api("GET", "/logs", params={"group_name": group, "page_size": 1000,
                                                     "page": page})  # fmt: skip
            rows += found["items"]
            if len(found["items"]) < 1000:
                return sorted(rows, key=lambda row: (row["timestamp"], row["id"]))
            page += 1

    def wait_logs(self, group: str, count: int, seconds: float = 15) -> list[dict[str, Any]]:
        """The group's rows once there are `count` of them (or what there is after
        `seconds`, for the caller to compare)."""
        rows: list[dict[str, Any]] = []

        def enough() -> bool:
            rows[:] = self.logs(group)
            return len(rows) >= count

        eventually(enough, seconds)
        return rows

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/health", headers=ADMIN, timeout=10).json())


def private_env(store_env: dict[str, str], tmp: Path, **extra: str) -> dict[str, str]:
    """A served gptload's environment: the run's store, the suite's admin key."""
    return {**store_env, "AUTH_KEY": ADMIN_KEY, **extra}


def start_gateway(env: dict[str, str], log: Path, fake: FakeProvider, *extra: str) -> Gateway:
    served = Served(env, log, *extra)
    try:
        served.wait_ready()
        gateway = Gateway(served, fake)
        gateway.api("PUT", "/settings", json={"request_log_write_interval_minutes": 0})
    except BaseException:
        served.stop()
        raise
    return gateway


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider


@pytest.fixture(scope="session")
def gateway(
    store_env: dict[str, str], fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """One served gptload for this test process's upstream-fault and vanishing-client
    tests; each test makes groups of its own, so they never see each other's keys."""
    if store_env.get("REDIS_DSN"):
        # Key states an earlier run shared name key ids this fresh database reuses.
        redis.Redis.from_url(store_env["REDIS_DSN"]).delete("gptload:key-states")
    tmp = tmp_path_factory.mktemp("gateway")
    env = private_env(store_env, tmp, MAX_CONCURRENT_REQUESTS=str(MAX_CONCURRENT))
    gateway = start_gateway(env, tmp / "serve.log", fake)
    yield gateway
    gateway.server.stop()


# -- private stores ------------------------------------------------------------------------


def die_with_parent() -> None:
    """Between fork and exec: SIGKILL this child when the test process dies, however."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)  # fmt: skip


class PrivateRedis:
    """A redis-server of this test's own on a loopback port, to kill and start again."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(self.tmp)],
                             self.tmp / "redis.log")  # fmt: skip
        client = redis.Redis.from_url(self.url)
        assert eventually(lambda: ping(client), 10, 0.05), "redis-server did not start"

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


class PrivateMariaDB:
    """A mariadbd of this test's own: its own data directory, port and socket, no grant
    tables (it listens on loopback only and lives for one test). `stop()` shuts it down
    as its service manager would (SIGTERM; a SIGKILL can lose a new data directory's
    first pages); `start()` again opens the same data directory."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.data = tmp / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = spawn([MARIADBD, "--no-defaults", f"--datadir={self.data}",
                              "--user=root", f"--port={self.port}", "--bind-address=127.0.0.1",
                              f"--socket={self.tmp / 'mysqld.sock'}",
                              f"--pid-file={self.tmp / 'mysqld.pid'}", "--skip-grant-tables",
                              "--skip-log-bin", "--innodb-buffer-pool-size=32M",
                              "--innodb-log-file-size=8M", "--innodb-flush-log-at-trx-commit=2"],
                             self.tmp / "mysqld.log")  # fmt: skip
        assert eventually(self.answers, 30, 0.05), (self.tmp / "mysqld.log").read_text()

    def answers(self) -> bool:
        return self.sql("SELECT 1").returncode == 0

    def sql(self, statement: str, database: str = "", stdin: Any = None) -> Any:
        return subprocess.run(
            ["mariadb", "-h127.0.0.1", f"-P{self.port}", "-uroot", *([database] if database else []),
             *(["-e", statement] if statement else [])],
            stdin=stdin, capture_output=stdin is None, check=False,
        )  # fmt: skip

    def copy_database(self, dsn: str, name: str) -> None:
        """A copy of the migrated database at `dsn` (the run's own, on the shared server)
        as database `name`: quicker than migrating one from nothing."""
        source = urlsplit(dsn)
        login = [f"-h{source.hostname}", f"-P{source.port or 3306}", f"-u{source.username}"]
        if source.password:
            login.append(f"-p{source.password}")
        assert self.sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4").returncode == 0
        dump = subprocess.Popen(["mariadb-dump", *login, "--single-transaction",
                                 source.path.strip("/")], stdout=subprocess.PIPE)  # fmt: skip
        loaded = self.sql("", name, stdin=dump.stdout)
        assert dump.wait() == 0
        assert loaded.returncode == 0

    def dsn(self, name: str) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def private_mariadb(tmp_path: Path) -> Iterator[PrivateMariaDB]:
    if not os.path.exists(MARIADBD):
        pytest.skip("mariadbd is not installed")
    server = PrivateMariaDB(tmp_path / "mariadb")
    server.start()
    yield server
    if server.process is not None:
        server.process.kill()
        server.process.wait()
    with contextlib.suppress(OSError):
        shutil.rmtree(server.data)


__all__ = ["ADMIN", "PROXY_KEY", "Gateway", "eventually", "manage", "start_gateway"]
