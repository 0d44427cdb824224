"""Fixtures shared by every app's tests: the store the run is on, and real server processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings

from gptload.lib import lifeline

ROOT = Path(__file__).resolve().parent
# The fault suite's counts, printed in the summary (registered here so that the process
# controlling pytest-xdist workers, which never collects tests/faults/, prints them).
pytest_plugins = ["tests.faults.tally"]
ON_MYSQL = settings.DATABASES["default"]["ENGINE"].endswith("mysql")
ON_REDIS = bool(settings.REDIS_DSN)
# A check that involves no store, or only an SQLite file of its own (the fake provider,
# startup errors, a server's process life), is the same on both passes: `make test` runs
# it once, on the SQLite pass, to keep within its budget.
SQLITE_PASS = pytest.mark.skipif(ON_MYSQL, reason="the same on every store: on the SQLite pass")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process: this one's, minus gptload's own variables."""
    env = {k: v for k, v in os.environ.items() if k not in GPTLOAD_VARS}
    env["SECRET_KEY"] = TEST_SECRET_KEY  # else each server makes one in its state directory
    env.update(overrides)
    return env


TEST_SECRET_KEY = "test-only-django-secret-0123456789abcdefghijklmnop"


GPTLOAD_VARS = frozenset(
    [
        "PORT",
        "HOST",
        "SERVER_READ_TIMEOUT",
        "SERVER_WRITE_TIMEOUT",
        "SERVER_IDLE_TIMEOUT",
        "SERVER_GRACEFUL_SHUTDOWN_TIMEOUT",
        "WEB_CONCURRENCY",
        "IS_SLAVE",
        "TZ",
        "AUTH_KEY",
        "ENCRYPTION_KEY",
        "DATABASE_DSN",
        "REDIS_DSN",
        "MAX_CONCURRENT_REQUESTS",
        "PUBLIC_URL",
        "DJANGO_DEBUG",
        "GPTLOAD_PARENT_PID",
        "STATS_RETENTION_DAYS",
        "ENABLE_CORS",
        "ALLOWED_ORIGINS",
        "ALLOWED_METHODS",
        "ALLOWED_HEADERS",
        "ALLOW_CREDENTIALS",
        "LOG_LEVEL",
        "LOG_FORMAT",
        "LOG_ENABLE_FILE",
        "LOG_FILE_PATH",
        "DJANGO_SETTINGS_MODULE",
        "SECRET_KEY",
        "MAX_REQUEST_BODY_MB",
        "FORWARDED_ALLOW_IPS",
        "SECURE_COOKIES",
        "HSTS_SECONDS",
        "HSTS_INCLUDE_SUBDOMAINS",
    ]
)


def manage(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(autouse=True)
def _forget_failed_sign_ins() -> Iterator[None]:
    """Wrong keys sent by one test (from the test client's 127.0.0.1) must not lock the
    next ones out: failed sign-ins are counted per address, across the whole API."""
    yield
    from django.core.cache import cache

    cache.delete("signin-failures:127.0.0.1")


@pytest.fixture(scope="session")
def store_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment of a migrated database (and Redis) of its own, for server processes.

    On the MariaDB run it is a fresh `test_gptload_srv_*` database, dropped at the end;
    otherwise a SQLite file in a temporary directory.
    """
    if ON_MYSQL:
        import MySQLdb

        db = settings.DATABASES["default"]
        # Named with their birth time, so that the ones a killed run left behind are
        # found and dropped by the next run (and a run in progress is left alone).
        name = f"test_gptload_srv_{int(time.time())}_{uuid.uuid4().hex[:8]}"
        admin = MySQLdb.connect(
            host=db["HOST"] or "127.0.0.1",
            port=int(db["PORT"] or 3306),
            user=db["USER"],
            passwd=db["PASSWORD"],
        )
        drop_abandoned_databases(admin.cursor())
        admin.cursor().execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        user = f"{db['USER']}:{db['PASSWORD']}" if db["PASSWORD"] else db["USER"]
        dsn = f"mysql://{user}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 3306}/{name}"
    else:
        dsn = f"sqlite:///{tmp_path_factory.mktemp('serverdb') / 'gptload.db'}"
    env = base_env(DATABASE_DSN=dsn, AUTH_KEY="sk-test-0123456789abcdefghij", LOG_LEVEL="warning")
    if ON_REDIS:
        env["REDIS_DSN"] = settings.REDIS_DSN
    result = manage("migrate", "--no-input", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    yield env
    if ON_MYSQL:
        admin.cursor().execute(f"DROP DATABASE `{name}`")
        admin.close()


ABANDONED_AFTER = 2 * 3600  # seconds; no test run lasts that long


def drop_abandoned_databases(cursor: Any) -> None:
    """Drops the server databases of test runs that were killed before their teardown."""
    cursor.execute("SHOW DATABASES LIKE 'test\\_gptload\\_srv\\_%'")
    for (name,) in cursor.fetchall():
        born = name.split("_")[3]  # not a number: named before birth times were
        if not born.isdigit() or time.time() - int(born) > ABANDONED_AFTER:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


class Server:
    """A gptload server process on a loopback port."""

    def __init__(self, command: list[str], env: dict[str, str], port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(  # dies with this test process, even if killed
            command, env=lifeline.child_env(env), cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}:\n{self.output()}")
            try:
                httpx.get(self.url + "/health", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout} s")

    def output(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def serve(store_env: dict[str, str]) -> Iterator[object]:
    """Starts `manage.py serve` (or another command) with the store environment; stops it after."""
    servers: list[Server] = []

    def start(
        *command: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        worker: bool = False,
    ) -> Server:
        """`manage.py serve` unless `command` says otherwise; its embedded Celery worker
        only if `worker` (a Celery start and stop is seconds of CPU most tests do not use)."""
        port = port or free_port()
        args = list(command) or [sys.executable, "manage.py", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), "--worker" if worker else "--no-worker"]  # fmt: skip
        server = Server(args, {**store_env, **(env or {})}, port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


ADMIN_KEY = "sk-admin-test-key-0123456789abcdef"


class AdminApi:
    """The management API through Django's test client, as an operator's script calls it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def call(self, method: str, path: str, body: Any = None, **extra: Any) -> Any:
        kwargs: dict[str, Any] = {"headers": {**self.headers, **extra.pop("headers", {})}}
        if body is not None:
            kwargs.update(data=json.dumps(body), content_type="application/json")
        return getattr(self.client, method)(f"/api{path}", **kwargs, **extra)

    def get(self, path: str, **extra: Any) -> Any:
        return self.call("get", path, **extra)

    def post(self, path: str, body: Any = None, **extra: Any) -> Any:
        return self.call("post", path, body, **extra)

    def put(self, path: str, body: Any = None, **extra: Any) -> Any:
        return self.call("put", path, body, **extra)

    def delete(self, path: str, body: Any = None, **extra: Any) -> Any:
        return self.call("delete", path, body, **extra)

    @staticmethod
    def data(response: Any, status: int = 200) -> Any:
        """The envelope's `data`, after checking the status and the envelope itself."""
        assert response.status_code == status, response.content
        body = response.json()
        assert (body["code"], body["message"]) == (0, "success"), body
        return body["data"]

    @staticmethod
    def refused(response: Any, status: int, code: str) -> str:
        """The error message, after checking GPT-Load's error shape, status and code."""
        assert response.status_code == status, response.content
        body = response.json()
        assert body["code"] == code, body
        assert body["message"]
        return str(body["message"])


@pytest.fixture
def admin_api(client: Any, settings: Any) -> AdminApi:
    """The management API with AUTH_KEY as a Bearer token (a staff session works too)."""
    settings.AUTH_KEY = ADMIN_KEY
    return AdminApi(client)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Django drops an SQLite test database's file, not its WAL and shared-memory files:
    remove this process's from the temporary folder too (the database is gone by now)."""
    if ON_MYSQL:
        return
    name = str(settings.DATABASES["default"].get("TEST", {}).get("NAME") or "")
    if not name.startswith(tempfile.gettempdir()):
        return
    for leftover in Path(name).parent.glob(Path(name).name + "*"):
        if leftover.name.endswith(("-wal", "-shm")):
            leftover.unlink(missing_ok=True)
