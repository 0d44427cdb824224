"""`manage.py serve` and daphne as an operator runs them: real processes on loopback ports."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ADMIN_KEY, ON_MYSQL, ON_REDIS, ROOT, SQLITE_PASS, free_port, manage
from gptload.lib.secrets import weakness
from tests.fakeprovider import Behaviour, FakeProvider


@SQLITE_PASS  # a process's life, the same on every store
def test_serve_answers_health_and_the_admin_and_stops_on_sigterm(serve):
    server = serve(worker=True)  # as `make run`: the stop includes its worker
    server.wait_ready()
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200
    assert health.json()["status"] == "healthy"
    login = httpx.get(server.url + "/admin/login/")
    assert login.status_code == 200
    assert "gptload" in login.text
    css = httpx.get(server.url + "/static/admin/css/base.css")
    assert css.status_code == 200
    began = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(15) == 0
    assert time.monotonic() - began < 10
    output = server.output()
    assert "Traceback" not in output


@SQLITE_PASS  # a process's life, the same on every store
def test_serve_stops_on_ctrl_c(serve):
    server = serve(worker=True)
    server.wait_ready()
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(15) == 0


@SQLITE_PASS  # a process's life, the same on every store
def test_serve_warns_loudly_about_a_weak_auth_key(serve):
    server = serve(env={"AUTH_KEY": "sk-123456"})
    server.wait_ready()
    server.stop()
    output = server.output()
    assert "WARNING: AUTH_KEY is weak: it is GPT-Load's published default sk-123456" in output


@SQLITE_PASS  # a process's life, the same on every store
def test_without_auth_key_a_strong_one_is_made_kept_and_shown_once(serve, tmp_path, store_env):
    db = tmp_path / "fresh" / "gptload.db"
    env = {"AUTH_KEY": "", "DATABASE_DSN": str(db)}
    first = serve(env=env)
    first.wait_ready()
    kept = db.parent / "auth_key"
    key = kept.read_text().strip()
    assert key.startswith("sk-")
    assert weakness(key) is None
    assert kept.stat().st_mode & 0o777 == 0o600
    assert httpx.get(first.url + "/api/channel-types",
                     headers={"Authorization": f"Bearer {key}"}).status_code == 200  # fmt: skip
    assert httpx.get(first.url + "/api/channel-types",
                     headers={"Authorization": "Bearer sk-123456"}).status_code == 401  # fmt: skip
    first.stop()
    assert key in first.output()
    second = serve(env=env)
    second.wait_ready()
    second.stop()
    assert key not in second.output()  # shown once; the command shows it again
    assert manage("auth_key", env={**store_env, **env}).stdout.strip() == key
    # Clients get the global proxy key, a random one of its own: it opens /proxy/ only,
    # and the AUTH_KEY never opens /proxy/.
    proxy_key = manage("auth_key", "--proxy", env={**store_env, **env}).stdout.strip()
    assert proxy_key.startswith("sk-")
    assert proxy_key != key
    assert weakness(proxy_key) is None
    third = serve(env=env)
    third.wait_ready()
    assert httpx.get(third.url + "/api/channel-types",
                     headers={"Authorization": f"Bearer {proxy_key}"}).status_code == 401  # fmt: skip
    for client_key, status in ((proxy_key, 404), (key, 401)):  # no group: 404 for a global key
        answer = httpx.post(third.url + "/proxy/none/v1/chat/completions", json={},
                            headers={"Authorization": f"Bearer {client_key}"})  # fmt: skip
        assert answer.status_code == status


@SQLITE_PASS  # a process's life, the same on every store
def test_daphne_serves_the_same_application(serve):
    port = free_port()
    server = serve(
        sys.executable,
        "-m",
        "daphne",
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "gptload.asgi:application",
        port=port,
    )
    server.wait_ready()
    assert httpx.get(server.url + "/health").json()["status"] == "healthy"
    assert httpx.get(server.url + "/admin/login/").status_code == 200


@pytest.mark.parametrize("server", ["uvicorn", "daphne"])
def test_the_live_dashboard_socket_is_served_by_uvicorn_and_daphne_to_staff_only(
    serve, store_env, server
):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    port = free_port()
    daphne = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
              "gptload.asgi:application"]  # fmt: skip
    running = serve(*(daphne if server == "daphne" else []), port=port)
    running.wait_ready()
    socket_url = f"ws://127.0.0.1:{port}/ws/dashboard/"
    origin = {"Origin": running.url}
    with httpx.Client(base_url=running.url) as browser:
        page = browser.get("/admin/login/").text
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        assert token
        signed_in = browser.post("/admin/login/", data={
            "csrfmiddlewaretoken": token[1], "username": "", "password": store_env["AUTH_KEY"]})  # fmt: skip
        assert signed_in.status_code == 302
        cookie = "; ".join(f"{name}={value}" for name, value in browser.cookies.items())
    with connect(
        socket_url, additional_headers={**origin, "Cookie": cookie}, open_timeout=10
    ) as ws:
        figures = json.loads(ws.recv(timeout=10))
    assert set(figures) == {"cards", "keys", "tokens_today", "hour"}
    assert "request_count" in figures["cards"]
    # Without a staff session the handshake is refused.
    with pytest.raises(InvalidStatus, match="403"):
        connect(socket_url, additional_headers=origin, open_timeout=10)
    # From another site's page (cross-site WebSocket hijacking), refused before anything.
    with pytest.raises(InvalidStatus, match="403"):
        connect(socket_url, additional_headers={"Origin": "https://evil.example", "Cookie": cookie},
                open_timeout=10)  # fmt: skip


def test_an_unreachable_database_stops_serve_with_one_line(store_env):
    dsn = "mysql://root:hunter2@127.0.0.1:1/gptload"
    result = manage(
        "serve", "--port", str(free_port()), env={**store_env, "DATABASE_DSN": dsn}, timeout=60
    )
    assert result.returncode != 0
    assert "DATABASE_DSN: cannot connect to mysql root@127.0.0.1:1/gptload" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_an_unreachable_redis_stops_serve_with_one_line(store_env):
    env = {**store_env, "REDIS_DSN": "redis://:hunter2@127.0.0.1:1/0"}
    result = manage("serve", "--port", str(free_port()), env=env, timeout=60)
    assert result.returncode != 0
    assert "REDIS_DSN: cannot connect to redis://:***@127.0.0.1:1/0" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(
    ON_MYSQL, reason="a fresh SQLite file shows the effect without a spare database"
)
def test_a_slave_node_runs_no_migrations(serve, tmp_path, store_env):
    db = tmp_path / "slave.db"
    server = serve(env={"DATABASE_DSN": str(db), "IS_SLAVE": "true"})
    server.wait_ready()
    operator = {"Authorization": f"Bearer {store_env['AUTH_KEY']}"}  # the role is no stranger's
    assert httpx.get(server.url + "/health", headers=operator).json()["role"] == "slave"
    tables = (
        sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    )
    assert ("django_migrations",) not in tables


@pytest.mark.skipif(
    ON_MYSQL, reason="a fresh SQLite file shows the effect without a spare database"
)
def test_a_master_node_migrates_a_fresh_database(serve, tmp_path):
    db = tmp_path / "fresh" / "gptload.db"
    server = serve(env={"DATABASE_DSN": str(db)})
    server.wait_ready()
    tables = {
        row[0]
        for row in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert {
        "keys_group",
        "keys_apikey",
        "logs_requestlog",
        "logs_hourlystat",
        "settings_app_systemsetting",
    } <= tables


@SQLITE_PASS  # a process's life, the same on every store
def test_log_format_json_writes_json_lines_from_every_process(serve, tmp_path):
    """uvicorn's, Django's and the embedded Celery worker's and beat's loggers alike."""
    log_file = tmp_path / "logs" / "app.log"
    env = {
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "debug",  # the worker and beat say what they do at info
        "LOG_ENABLE_FILE": "true",
        "LOG_FILE_PATH": str(log_file),
    }
    server = serve(env=env, worker=True)
    server.wait_ready()
    wanted = {"uvicorn.error", "celery.apps.worker", "celery.beat"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not wanted <= loggers_in(log_file):
        time.sleep(0.5)
    server.stop()
    lines = log_file.read_text().splitlines()
    assert lines
    for line in lines:
        record = json.loads(line)  # every line, whichever process wrote it
        assert {"time", "level", "logger", "message"} <= set(record), record
    assert wanted <= loggers_in(log_file)


def loggers_in(log_file: Path) -> set[str]:
    found = set()
    for line in log_file.read_text().splitlines() if log_file.exists() else []:
        try:
            found.add(json.loads(line)["logger"])
        except (ValueError, KeyError):
            found.add("(not JSON)")
    return found


def children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def workers_of(server) -> set[int]:
    return {pid for pid, cmd in children(server.process.pid).items() if "celery" in cmd}


@SQLITE_PASS  # a process's life, the same on every store
def test_serve_runs_and_supervises_the_embedded_worker(serve, tmp_path):
    """Started from another folder (the worker once looked for `gptload` there, and
    restarted for ever)."""
    port = free_port()
    command = (f"cd {tmp_path} && exec {sys.executable} {ROOT / 'manage.py'} serve --host "
               f"127.0.0.1 --port {port} --worker")  # fmt: skip
    server = serve("sh", "-c", command, env={"AUTH_KEY": ADMIN_KEY}, port=port)
    server.wait_ready()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    group = httpx.post(server.url + "/api/groups", headers=admin, json={
        "name": f"emb{time.monotonic_ns()}", "channel_type": "openai", "test_model": "m",
        "upstreams": [{"url": "https://api.openai.com", "weight": 1}]}).json()["data"]  # fmt: skip

    def import_keys(text: str) -> dict[str, Any]:
        started = httpx.post(server.url + "/api/keys/add-async", headers=admin,
                             json={"group_id": group["id"], "keys_text": text})  # fmt: skip
        assert started.status_code == 200, started.text
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = httpx.get(server.url + f"/api/tasks/status?group_id={group['id']}",
                               headers=admin).json()["data"]  # fmt: skip
            if not status["is_running"]:
                return status
            time.sleep(0.2)
        raise AssertionError(f"the job did not finish: {status}")

    assert import_keys("sk-emb-1111111111\nsk-emb-2222222222")["result"]["added_count"] == 2
    first = workers_of(server)
    assert first
    os.kill(min(first), signal.SIGKILL)  # a crashed worker comes back
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (workers_of(server) - first):
        time.sleep(0.2)
    assert workers_of(server) - first
    assert import_keys("sk-emb-3333333333")["result"]["added_count"] == 1
    survivors = workers_of(server)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    time.sleep(0.5)
    assert not [pid for pid in survivors if Path(f"/proc/{pid}").exists()]


def make_proxied_group(server: Any, upstream: str) -> str:
    """A group on `upstream` with one key, through the server's API; returns its name."""
    name = f"drain{time.monotonic_ns()}"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    group = httpx.post(server.url + "/api/groups", headers=admin, json={
        "name": name, "channel_type": "openai", "test_model": "m", "proxy_keys": DRAIN_KEY,
        "upstreams": [{"url": upstream, "weight": 1}]}).json()["data"]  # fmt: skip
    httpx.post(server.url + "/api/keys/add-multiple", headers=admin,
               json={"group_id": group["id"], "keys_text": "k1"})  # fmt: skip
    time.sleep(1.2)  # the new group reaches the proxy's snapshot
    return name


def logged_rows(store_env: dict[str, str], name: str) -> str:
    count = manage("shell", "-c", "from logs.models import RequestLog; "
                   f"print(RequestLog.objects.filter(group_name='{name}', status_code=200).count())",
                   env={**store_env, "AUTH_KEY": ADMIN_KEY})  # fmt: skip
    return count.stdout.split()[-1] if count.stdout.split() else count.stderr


DRAIN_KEY = "sk-drain-proxy-0123456789"
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_sigterm_finishes_a_stream_in_flight_and_writes_its_log(serve, store_env):
    with FakeProvider() as fake:
        fake.behave_default(Behaviour(event_interval=0.4, events=6))  # a 2 s stream
        server = serve(env={"AUTH_KEY": ADMIN_KEY})
        server.wait_ready()
        name = make_proxied_group(server, fake.url)
        with httpx.stream("POST", f"{server.url}/proxy/{name}/v1/chat/completions",
                          json={**CHAT_BODY, "stream": True},
                          headers={"Authorization": f"Bearer {DRAIN_KEY}"}) as stream:  # fmt: skip
            chunks = stream.iter_bytes()
            received = next(chunks)
            server.process.send_signal(signal.SIGTERM)  # mid-stream
            received += b"".join(chunks)
        assert received.endswith(b"data: [DONE]\n\n")
        assert server.process.wait(30) == 0
    assert logged_rows(store_env, name) == "1"  # flushed at exit, not a minute later


def test_daphne_writes_buffered_log_rows_at_exit(serve, store_env):
    port = free_port()
    with FakeProvider() as fake:
        server = serve(sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                       "gptload.asgi:application", port=port, env={"AUTH_KEY": ADMIN_KEY})  # fmt: skip
        server.wait_ready()
        name = make_proxied_group(server, fake.url)
        answer = httpx.post(f"{server.url}/proxy/{name}/v1/chat/completions", json=CHAT_BODY,
                            headers={"Authorization": f"Bearer {DRAIN_KEY}"})  # fmt: skip
        assert answer.status_code == 200
        server.process.send_signal(signal.SIGTERM)  # daphne has no lifespan to flush in
        server.process.wait(30)
    assert logged_rows(store_env, name) == "1"


@SQLITE_PASS  # a process's life, the same on every store
def test_no_child_outlives_a_killed_serve(serve):
    """SIGKILL (or the OOM killer) gives serve no chance to stop its children: they go
    by themselves, the embedded worker (and its beat) and the uvicorn workers alike."""
    port = free_port()
    server = serve(sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port",
                   str(port), "--worker", "--workers", "2", env={"AUTH_KEY": ADMIN_KEY},
                   port=port)  # fmt: skip
    server.wait_ready()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(children(server.process.pid)) < 3:
        time.sleep(0.2)
    kids = children(server.process.pid)
    assert any("celery" in cmd for cmd in kids.values()), kids
    assert len(kids) >= 3, kids  # the worker and two uvicorn workers
    # ... and the beat the Celery worker forks, which the kernel's death signal does not
    # reach by inheritance.
    (worker,) = workers_of(server)
    while time.monotonic() < deadline and not children(worker):
        time.sleep(0.2)
    beat = children(worker)
    assert beat, "the embedded worker forked no beat"
    kids |= beat
    server.process.kill()
    server.process.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(map(running, kids)):
        time.sleep(0.2)
    alive = [pid for pid in kids if running(pid)]
    assert not alive, {pid: kids[pid] for pid in alive}


@SQLITE_PASS  # a process's life, the same on every store
def test_a_killed_embedded_worker_takes_its_beat_with_it(serve):
    """Beat is forked by the Celery worker; a worker that dies without stopping it (killed,
    or stopped while it was still starting) must not leave it sending the periodic jobs
    beside the beat of the worker that replaces it."""
    port = free_port()  # --worker: with Redis, serve starts none unless asked
    server = serve(sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port",
                   str(port), "--worker", port=port)  # fmt: skip
    server.wait_ready()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
        workers_of(server) and children(min(workers_of(server)))
    ):
        time.sleep(0.2)
    (worker,) = workers_of(server)
    beat = set(children(worker))
    assert beat, "the embedded worker forked no beat"
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(map(running, beat)):
        time.sleep(0.2)
    assert not any(map(running, beat))


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its parent is not)."""
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_without_a_worker_jobs_say_they_wait_for_one_and_serve_says_what_to_run(serve, store_env):
    # Forget the heartbeat of any worker an earlier test ran on this store.
    if ON_REDIS:
        from django.core.cache import cache

        cache.delete("heartbeat:worker")
    else:
        db = Path(store_env["DATABASE_DSN"].removeprefix("sqlite:///"))
        (db.parent / "celery" / "heartbeat-worker").unlink(missing_ok=True)
    port = free_port()
    server = serve(sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port",
                   str(port), "--no-worker", env={"AUTH_KEY": ADMIN_KEY}, port=port)  # fmt: skip
    server.wait_ready()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    group = httpx.post(server.url + "/api/groups", headers=admin, json={
        "name": f"wait{time.monotonic_ns()}", "channel_type": "openai", "test_model": "m",
        "upstreams": [{"url": "https://api.openai.com", "weight": 1}]}).json()["data"]  # fmt: skip
    started = httpx.post(server.url + "/api/keys/add-async", headers=admin,
                         json={"group_id": group["id"], "keys_text": "sk-wait-1111111111"})  # fmt: skip
    assert started.status_code == 200, started.text
    status = httpx.get(server.url + f"/api/tasks/status?group_id={group['id']}",
                       headers={**admin, "Accept-Language": "ja"}).json()["data"]  # fmt: skip
    assert status["status"] == "pending"
    assert status["waiting_for_worker"] is True
    assert "celery -A gptload worker" in status["note"]
    assert "ワーカー" in status["note"]
    server.stop()
    output = server.output()
    assert "celery -A gptload worker" in output
    assert "celery -A gptload beat" in output
