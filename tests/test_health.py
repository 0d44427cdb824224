from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from django.core.cache import cache
from django.db import connection
from django.test import override_settings

from conftest import ON_MYSQL, ON_REDIS, free_port
from gptload.lib import heartbeat
from logs import dashboard

DEAD_REDIS = "redis://127.0.0.1:1/0"
ADMIN_KEY = "sk-health-admin-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def operator_key(settings):
    settings.AUTH_KEY = ADMIN_KEY


@pytest.fixture
def no_heartbeats(settings, tmp_path):
    """No worker or beat heard from: heartbeat files in a folder of the test's own, and
    (with Redis) the shared notes removed."""
    settings.CELERY_DATA_DIR = tmp_path / "celery"
    roles = [f"heartbeat:{role}" for role in heartbeat.ROLES]
    if ON_REDIS:
        cache.delete_many(roles)
    yield
    if ON_REDIS:
        cache.delete_many(roles)


def dead_redis_settings():
    cache = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": DEAD_REDIS,
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1},
    }
    return override_settings(REDIS_DSN=DEAD_REDIS, CACHES={"default": cache})


@pytest.mark.django_db
def test_it_is_healthy_with_the_database_up(client, operator_key):
    assert client.get("/health").json() == {"status": "healthy"}  # anonymous: status only
    response = client.get("/health", headers=ADMIN)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["checks"]["database"]["status"] == "up"
    assert body["timestamp"].endswith("Z")
    assert set(body) >= {"uptime", "uptime_seconds", "role", "request_log"}
    assert ("redis" in body["checks"]) is ON_REDIS


@pytest.mark.skipif(not ON_REDIS, reason="Redis is only checked when REDIS_DSN is set")
@pytest.mark.django_db
def test_it_checks_redis_when_configured(client, operator_key):
    assert client.get("/health", headers=ADMIN).json()["checks"]["redis"]["status"] == "up"


@pytest.mark.django_db
def test_it_is_unhealthy_when_redis_is_down(client, operator_key):
    with dead_redis_settings():
        anonymous = client.get("/health")
        response = client.get("/health", headers=ADMIN)
    assert anonymous.status_code == 503
    assert anonymous.json() == {"status": "unhealthy"}
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["checks"]["redis"]["status"] == "down"
    assert "ConnectionError" in body["checks"]["redis"]["error"]
    assert body["checks"]["database"]["status"] == "up"


@pytest.mark.skipif(not ON_MYSQL, reason="SQLite's in-memory test database cannot be taken away")
@pytest.mark.django_db(transaction=True)
def test_it_is_unhealthy_when_mysql_is_down(client, operator_key):
    original = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict["PORT"] = 1  # nothing listens there
    try:
        anonymous = client.get("/health")
        response = client.get("/health", headers=ADMIN)
    finally:
        connection.close()
        connection.settings_dict.update(original)
    assert (anonymous.status_code, anonymous.json()) == (503, {"status": "unhealthy"})
    assert_database_down(response.status_code, response.json())


def test_it_is_unhealthy_when_the_sqlite_file_is_gone(serve, tmp_path):
    folder = tmp_path / "db"
    server = serve(env={"DATABASE_DSN": str(folder / "gptload.db"), "AUTH_KEY": ADMIN_KEY})
    server.wait_ready()
    assert httpx.get(server.url + "/health").status_code == 200
    folder.rename(tmp_path / "moved")  # the disk the database lives on goes away
    anonymous = httpx.get(server.url + "/health")
    assert anonymous.status_code == 503
    assert anonymous.json() == {"status": "unhealthy"}  # no path, no error text
    response = httpx.get(server.url + "/health", headers=ADMIN)
    assert_database_down(response.status_code, response.json())
    (tmp_path / "moved").rename(folder)
    assert httpx.get(server.url + "/health").status_code == 200  # and it recovers


def assert_database_down(status: int, body: dict) -> None:
    assert status == 503
    assert body["status"] == "unhealthy"
    assert body["checks"]["database"]["status"] == "down"
    assert "OperationalError" in body["checks"]["database"]["error"]


def test_only_get_is_allowed(client):
    assert client.post("/health").status_code == 405
    assert client.post("/health/ready").status_code == 405


@pytest.mark.django_db
def test_ready_needs_a_worker_and_beat_heard_from_lately(client, operator_key, no_heartbeats):
    anonymous = client.get("/health/ready")
    assert anonymous.status_code == 503
    assert anonymous.json() == {"status": "not_ready", "failed": ["worker", "beat"]}
    detailed = client.get("/health/ready", headers=ADMIN).json()
    assert detailed["checks"]["worker"] == {"status": "down", "last_seen": None,
                                            "error": "never heard from"}  # fmt: skip
    assert detailed["checks"]["database"]["status"] == "up"
    assert {w["type"] for w in dashboard.operations_warnings()} == {"worker", "beat"}
    heartbeat.note(heartbeat.WORKER)
    assert client.get("/health/ready").json() == {"status": "not_ready", "failed": ["beat"]}
    assert [w["type"] for w in dashboard.operations_warnings()] == ["beat"]
    heartbeat.note(heartbeat.BEAT)
    ready = client.get("/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready", "failed": []})
    assert dashboard.operations_warnings() == []
    # ... until they go quiet for longer than STALE_AFTER.
    later = time.time() + heartbeat.STALE_AFTER + 1
    assert not any(seen.alive for seen in heartbeat.background(later).values())


@pytest.mark.django_db
def test_ready_names_redis_when_it_is_down(client, operator_key, no_heartbeats):
    with dead_redis_settings():
        anonymous = client.get("/health/ready")
        detailed = client.get("/health/ready", headers=ADMIN).json()
    assert anonymous.status_code == 503
    assert anonymous.json()["failed"] == ["redis", "worker", "beat"]
    assert "ConnectionError" in detailed["checks"]["worker"]["error"]  # the notes live there


def forget_heartbeats(store_env: dict[str, str]) -> None:
    """Removes the heartbeats earlier tests' servers left for `store_env`'s processes."""
    if ON_REDIS:
        cache.delete_many([f"heartbeat:{role}" for role in heartbeat.ROLES])
    else:
        state = Path(store_env["DATABASE_DSN"].removeprefix("sqlite:///")).parent
        for role in heartbeat.ROLES:
            (state / "celery" / f"heartbeat-{role}").unlink(missing_ok=True)


def test_a_served_node_is_ready_once_its_embedded_worker_and_beat_run(serve, store_env):
    forget_heartbeats(store_env)
    idle = serve(env={"AUTH_KEY": ADMIN_KEY})  # no worker
    idle.wait_ready()
    waiting = httpx.get(idle.url + "/health/ready")
    assert waiting.status_code == 503
    assert waiting.json() == {"status": "not_ready", "failed": ["worker", "beat"]}
    assert httpx.get(idle.url + "/health").status_code == 200  # alive all the same
    idle.stop()
    working = serve(env={"AUTH_KEY": ADMIN_KEY}, worker=True)
    working.wait_ready()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = httpx.get(working.url + "/health/ready", headers=ADMIN)
        if ready.status_code == 200:
            break
        time.sleep(0.5)
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["worker"]["status"] == checks["beat"]["status"] == "up"


def test_a_stopped_redis_is_no_anonymous_callers_business(serve, tmp_path):
    """A Redis of the test's own, stopped under a running node: anonymous callers learn
    that the node is unhealthy, not where its Redis lives or what went wrong."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    redis = subprocess.Popen(
        [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)
        server = serve(env={"AUTH_KEY": ADMIN_KEY, "REDIS_DSN": f"redis://127.0.0.1:{port}/0"})
        server.wait_ready()
        assert httpx.get(server.url + "/health").json() == {"status": "healthy"}
        redis.send_signal(signal.SIGKILL)
        redis.wait()
        anonymous = httpx.get(server.url + "/health")
        assert (anonymous.status_code, anonymous.json()) == (503, {"status": "unhealthy"})
        ready = httpx.get(server.url + "/health/ready")
        assert ready.status_code == 503
        assert str(port) not in ready.text
        assert "Error" not in ready.text
        detailed = httpx.get(server.url + "/health", headers=ADMIN).json()
        assert "ConnectionError" in detailed["checks"]["redis"]["error"]
    finally:
        redis.kill()
        redis.wait()


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")
