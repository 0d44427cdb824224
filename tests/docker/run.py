"""`make test-docker`: build the image and run it, for real, on this machine.

Not part of `make test` (it needs root, a Docker engine and a few minutes). It:

1. installs what is missing (Debian's docker.io, docker-compose, debootstrap) and starts
   `dockerd` when no engine answers (host networking only: no bridge, no iptables);
2. builds the base image with docker/base/build-base.sh when it is missing (no image
   registry is reached: Debian's packages only), then the image with the classic builder
   and the host's network, pip using the index and certificate authorities of this host;
3. runs one container (the embedded default: SQLite, embedded worker) on the host's
   network: its HEALTHCHECK, /health, the admin's sign-in page and a collected static file,
   the keys read as the README says (`manage.py auth_key`), an import job, a proxied call to
   a fake provider, then `docker stop` during a slow call: the call completes, the
   container exits 0 within the graceful timeout; then the Compose file's default service
   the same way, with docker/.env.example unchanged as its .env;
4. runs the Compose file's `cluster` profile with docker/docker-compose.test.yml on this
   machine's MariaDB (a database of its own, dropped after) and Redis (a database number
   of its own, emptied): two web nodes, a worker and beat healthy, an import through the
   follower run by the worker, a key benched on one node skipped by the other, a clean stop.

Containers, the test database and the Redis database are removed whatever happens; the
images are kept (the next run reuses them). Environment knobs: GPTLOAD_DOCKER_BASE (the
base image; `python:3.11-slim-bookworm` builds on the official one), GPTLOAD_DOCKER_IMAGE,
GPTLOAD_DOCKER_REDIS_DB, GPTLOAD_DOCKER_DATABASE_URL (the MariaDB server, as root).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fakeprovider import Behaviour, FakeProvider  # noqa: E402

OFFICIAL_BASE = "python:3.11-slim-bookworm"
BASE = os.environ.get("GPTLOAD_DOCKER_BASE", "gptload-base:bookworm")
IMAGE = os.environ.get("GPTLOAD_DOCKER_IMAGE", "gptload:test")
REDIS_DB = int(os.environ.get("GPTLOAD_DOCKER_REDIS_DB", "10"))
MARIADB = urlsplit(os.environ.get("GPTLOAD_DOCKER_DATABASE_URL", "mysql://root@127.0.0.1:3306"))
COMPOSE_FILES = ["-f", "docker/docker-compose.yml", "-f", "docker/docker-compose.test.yml"]
CLUSTER = ("web1", "web2", "worker", "beat")
UID = 1000  # the image's user (GPTLOAD_UID)
RUN_ID = f"{os.getpid()}"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
GRACEFUL = 10  # SERVER_GRACEFUL_SHUTDOWN_TIMEOUT's default
STOP_GRACE = 30  # the Compose file's stop_grace_period for the web nodes


class CheckFailed(AssertionError):
    pass


class Report:
    """Each check's outcome and time, printed as it ends and again as a summary."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, str]] = []
        self.began = time.monotonic()

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        print(f"-- {name} ...", flush=True)
        try:
            yield
        except BaseException as exc:
            seconds = time.monotonic() - began
            self.rows.append((name, "FAIL", seconds, f"{type(exc).__name__}: {exc}"))
            print(f"FAIL {name} ({seconds:.1f} s): {exc}", flush=True)
            raise
        seconds = time.monotonic() - began
        self.rows.append((name, "PASS", seconds, ""))
        print(f"PASS {name} ({seconds:.1f} s)", flush=True)

    def summary(self) -> bool:
        passed = all(row[1] == "PASS" for row in self.rows) and bool(self.rows)
        print("\n== make test-docker: summary ==")
        for name, outcome, seconds, detail in self.rows:
            print(f"{outcome}  {seconds:6.1f} s  {name}" + (f"\n      {detail}" if detail else ""))
        total = time.monotonic() - self.began
        verdict = "passed" if passed else "FAILED"
        print(f"{sum(r[1] == 'PASS' for r in self.rows)}/{len(self.rows)} checks {verdict} "
              f"in {total:.0f} s")  # fmt: skip
        return passed


def expect(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def run(
    *command: str, timeout: float = 120, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    if check and done.returncode != 0:
        raise CheckFailed(
            f"{' '.join(command[:4])} ... exited {done.returncode}:\n{done.stdout[-2000:]}"
            f"{done.stderr[-2000:]}"
        )
    return done


def stream(*command: str, env: dict[str, str] | None = None, timeout: float = 3600) -> None:
    """Runs a long command with its output shown as it comes, indented."""
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:  # fmt: skip
        assert process.stdout is not None
        for line in process.stdout:
            print("    " + line.rstrip(), flush=True)
        code = process.wait(timeout)
    if code != 0:
        raise CheckFailed(f"{' '.join(command[:4])} ... exited {code}")


def within(seconds: float, condition: Callable[[], object], interval: float = 0.25) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, OSError):
            if condition():
                return True
        time.sleep(interval)
    return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- the engine and the tools ---------------------------------------------------------


def compose_command() -> list[str] | None:
    """Compose v2 when the client has it, else Debian's docker-compose (1.29)."""
    if shutil.which("docker") and run("docker", "compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def install_tools() -> None:
    wanted = []
    if not shutil.which("docker") or not shutil.which("dockerd"):
        wanted.append("docker.io")
    if compose_command() is None:
        wanted.append("docker-compose")
    if BASE.startswith("gptload-base") and not shutil.which("debootstrap"):
        wanted.append("debootstrap")
    if not wanted:
        print("    docker, dockerd, compose and debootstrap are installed")
        return
    expect(os.geteuid() == 0, f"installing {', '.join(wanted)} needs root")
    print(f"    apt-get install {' '.join(wanted)}")
    run("apt-get", "update", "-qq", timeout=600)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run("apt-get", "install", "-y", "-qq", *wanted, env=env, timeout=1200)


def engine_answers() -> bool:
    return run("docker", "info", "--format", "{{.ServerVersion}}", check=False).returncode == 0


def start_engine() -> None:
    if engine_answers():
        version = run("docker", "info", "--format", "{{.ServerVersion}}").stdout.strip()
        print(f"    a Docker engine answers (server {version})")
        return
    expect(os.geteuid() == 0, "starting dockerd needs root")
    log = Path(tempfile.gettempdir()) / "gptload-dockerd.log"
    print(f"    starting dockerd (host networking only; its log: {log})")
    with log.open("ab") as output:
        # Left running for the next run; its own session, so that it outlives this one.
        subprocess.Popen(["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none"],
                         stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)  # fmt: skip
    expect(within(60, engine_answers, 0.5), f"dockerd did not answer within 60 s (see {log})")


def image_exists(name: str) -> bool:
    return run("docker", "image", "inspect", name, check=False).returncode == 0


# --- the images -------------------------------------------------------------------------


def build_base() -> None:
    if BASE == OFFICIAL_BASE or not BASE.startswith("gptload-base"):
        expect(image_exists(BASE), f"{BASE} is not on this machine and nothing is pulled")
        print(f"    using {BASE}")
        return
    if image_exists(BASE):
        print(f"    {BASE} exists (built before; `docker rmi {BASE}` to rebuild it)")
        return
    stream("nice", "-n", "10", "docker/base/build-base.sh", BASE, timeout=3600)


def pip_index() -> str | None:
    """The index pip uses on this host, if it is not pip's default and a container can
    reach it (an http(s) URL; a file:// index lives on this disk only)."""
    index = os.environ.get("PIP_INDEX_URL")
    if not index:
        asked = run(sys.executable, "-m", "pip", "config", "get", "global.index-url",
                    check=False)  # fmt: skip
        index = asked.stdout.strip() if asked.returncode == 0 else ""
    return index if index.startswith(("http://", "https://")) else None


def extra_certificates() -> str:
    """The certificate authorities this host adds to Debian's (what its pip trusts)."""
    folder = Path("/usr/local/share/ca-certificates")
    pems = sorted(folder.rglob("*.crt")) if folder.is_dir() else []
    return "\n".join(pem.read_text().strip() for pem in pems)


def build_image() -> None:
    command = ["nice", "-n", "10", "docker", "build", "--network", "host",
               "-f", "docker/Dockerfile", "-t", IMAGE]  # fmt: skip
    if BASE != OFFICIAL_BASE:
        command += ["--build-arg", f"BASE_IMAGE={BASE}"]
    if index := pip_index():
        command += ["--build-arg", f"PIP_INDEX_URL={index}"]
    if certificates := extra_certificates():
        command += ["--build-arg", f"EXTRA_CA_CERTS={certificates}"]
    print(f"    DOCKER_BUILDKIT=0 docker build --network host (base {BASE}, "
          f"index {index or 'pip default'}, extra CAs {'yes' if certificates else 'no'})")  # fmt: skip
    stream(*command, ".", env=dict(os.environ, DOCKER_BUILDKIT="0"))


# --- one container: the embedded default ------------------------------------------------


def health(container: str) -> str:
    done = run("docker", "inspect", "--format",
               "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}", container,
               check=False)  # fmt: skip
    return done.stdout.strip()


def logs(container: str, lines: int = 60) -> None:
    done = run("docker", "logs", "--tail", str(lines), container, check=False)
    print(f"---- last lines of {container}'s log ----\n{done.stdout}{done.stderr}----", flush=True)


def wait_job(url: str, admin: dict[str, str], group_id: int, seconds: float = 60) -> dict[str, Any]:
    status: dict[str, Any] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/api/tasks/status?group_id={group_id}", headers=admin,
                           timeout=10).json()["data"]  # fmt: skip
        if status.get("status") in ("succeeded", "failed") and not status.get("is_running"):
            return status
        time.sleep(0.25)
    raise CheckFailed(f"the import job did not finish in {seconds:.0f} s: {status}")


def single(report: Report, fake: FakeProvider) -> None:
    name = f"gptload-dockertest-{RUN_ID}"
    data = Path(tempfile.mkdtemp(prefix="gptload-docker-data-"))
    os.chown(data, UID, UID)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        with report.check("single: container starts, /health answers 200"):
            run("docker", "run", "-d", "--name", name, "--network", "host",
                "-e", "HOST=127.0.0.1", "-e", f"PORT={port}",
                "--health-interval", "2s", "--health-start-period", "60s",
                "-v", f"{data}:/app/data", IMAGE)  # fmt: skip
            ok = within(90, lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200)
            if not ok:
                logs(name)
            expect(ok, "/health did not answer 200 within 90 s")
        with report.check("single: runs as a non-root user"):
            uid = run("docker", "exec", name, "id", "-u").stdout.strip()
            expect(uid == str(UID), f"the server runs as uid {uid}")
        with report.check("single: the image's HEALTHCHECK says healthy"):
            expect(within(60, lambda: health(name) == "healthy", 1),
                   f"health status {health(name)!r}")  # fmt: skip
        with report.check("single: /admin/login/ 200 and collected static files served"):
            page = httpx.get(f"{url}/admin/login/", timeout=10)
            expect(page.status_code == 200, f"/admin/login/ answered {page.status_code}")
            expect("csrfmiddlewaretoken" in page.text, "no sign-in form on /admin/login/")
            static = run("docker", "exec", name, "sh", "-c",
                         "cd /app/staticfiles && ls admin/css/base.css").stdout.strip()  # fmt: skip
            css = httpx.get(f"{url}/static/{static}", timeout=10)
            expect(css.status_code == 200, f"/static/{static} answered {css.status_code}")
        with report.check("single: keys read with `manage.py auth_key` (README)"):
            auth_key = run("docker", "exec", name, "python", "manage.py", "auth_key").stdout
            proxy_keys = run("docker", "exec", name, "python", "manage.py", "auth_key",
                             "--proxy").stdout  # fmt: skip
            auth_key, proxy_key = auth_key.strip(), proxy_keys.strip().split(",")[0]
            expect(len(auth_key) >= 32 and proxy_key, "no generated keys")
            expect(auth_key != proxy_key, "the admin key is also a proxy key")
            mode = run("docker", "exec", name, "stat", "-c", "%a %u", "/app/data/auth_key").stdout
            expect(mode.split() == ["600", str(UID)], f"data/auth_key is {mode.strip()}")
        admin = {"Authorization": f"Bearer {auth_key}"}
        with report.check("single: an import job finishes (the embedded worker runs)"):
            group = httpx.post(f"{url}/api/groups", headers=admin, timeout=10, json={
                "name": "docker", "channel_type": "openai", "test_model": "m",
                "upstreams": [{"url": fake.url, "weight": 1}]})  # fmt: skip
            expect(group.status_code == 200, f"group not created: {group.text}")
            group_id = group.json()["data"]["id"]
            keys = [f"sk-docker-{n}-{secrets.token_hex(8)}" for n in range(3)]
            started = httpx.post(f"{url}/api/keys/add-async", headers=admin, timeout=30,
                                 json={"group_id": group_id, "keys_text": "\n".join(keys)})  # fmt: skip
            expect(started.status_code == 200, f"add-async answered {started.text}")
            status = wait_job(url, admin, group_id)
            expect(status["status"] == "succeeded", f"the job ended {status}")
            expect(status["result"]["added_count"] == 3, f"the job's result: {status}")
        with report.check("single: a proxied call reaches the fake provider"):
            fake.clear()
            answer = httpx.post(f"{url}/proxy/docker/v1/chat/completions", json=CHAT,
                                headers={"Authorization": f"Bearer {proxy_key}"},
                                timeout=30)  # fmt: skip
            expect(answer.status_code == 200, f"the proxy answered {answer.status_code}: "
                   f"{answer.text[:300]}")  # fmt: skip
            expect(answer.json()["choices"], "no choices in the answer")
            used = fake.keys_used()
            expect(len(used) == 1 and used[0] in keys, f"the provider saw {used}")
        with report.check(
            f"single: docker stop mid-call: the call completes, exit 0 < {GRACEFUL} s"
        ):
            fake.behave_default(Behaviour(first_byte_delay=3))
            outcome: dict[str, Any] = {}

            def slow_call() -> None:
                try:
                    outcome["status"] = httpx.post(
                        f"{url}/proxy/docker/v1/chat/completions", json=CHAT, timeout=30,
                        headers={"Authorization": f"Bearer {proxy_key}"}).status_code  # fmt: skip
                except httpx.HTTPError as exc:
                    outcome["error"] = repr(exc)

            caller = threading.Thread(target=slow_call)
            caller.start()
            expect(fake.wait_until(lambda: fake.in_progress > 0, 10), "the call never arrived")
            began = time.monotonic()
            run("docker", "stop", "-t", str(STOP_GRACE), name, timeout=STOP_GRACE + 30)
            took = time.monotonic() - began
            caller.join(30)
            fake.behave_default(Behaviour())
            state = json.loads(run("docker", "inspect", "--format", "{{json .State}}",
                                   name).stdout)  # fmt: skip
            print(f"    stopped in {took:.1f} s, exit code {state['ExitCode']}, "
                  f"in-flight call: {outcome}")  # fmt: skip
            if state["ExitCode"] != 0:
                logs(name)
            expect(outcome.get("status") == 200, f"the in-flight call: {outcome}")
            expect(state["ExitCode"] == 0, f"exit code {state['ExitCode']}")
            expect(took < GRACEFUL, f"the stop took {took:.1f} s")
    finally:
        run("docker", "rm", "-f", name, check=False)
        shutil.rmtree(data, ignore_errors=True)


# --- the cluster profile ----------------------------------------------------------------


def mariadb(statement: str) -> None:
    import MySQLdb

    connection = MySQLdb.connect(host=MARIADB.hostname or "127.0.0.1", port=MARIADB.port or 3306,
                                 user=MARIADB.username or "root", passwd=MARIADB.password or "")  # fmt: skip
    try:
        connection.cursor().execute(statement)
    finally:
        connection.close()


def flush_redis() -> None:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()


def merge(base: list[str], env: dict[str, str], into: Path, *profiles: str) -> None:
    """docker-compose.yml with the test override, as Compose merges them, less the ports
    of the services on the host's network: nothing is published there, and docker-compose
    1.29 refuses the two together (an override cannot remove a list's entries in 1.29)."""
    chosen = [arg for profile in profiles for arg in ("--profile", profile)]
    merged = run(*base, *COMPOSE_FILES, *chosen, "config", env=env).stdout
    config = yaml.safe_load(merged)
    for service in config["services"].values():
        if service.get("network_mode") == "host":
            service.pop("ports", None)
    into.write_text(yaml.safe_dump(config, sort_keys=False))


def container_ids(compose: list[str], env: dict[str, str]) -> dict[str, str]:
    ids = {}
    for service in CLUSTER:
        ids[service] = run(*compose, "ps", "-q", service, env=env).stdout.strip()
    return ids


def cluster(report: Report, fake: FakeProvider, base: list[str]) -> None:
    database = f"gptload_dockertest_{RUN_ID}"
    project = f"gptload-dockertest-{RUN_ID}"
    folder = Path(tempfile.mkdtemp(prefix="gptload-docker-cluster-"))
    env_file = folder / "cluster.env"
    admin_key = "sk-docker-" + secrets.token_urlsafe(32)
    env_file.write_text(
        f"AUTH_KEY={admin_key}\nSECRET_KEY={secrets.token_urlsafe(48)}\n"
        f"ENCRYPTION_KEY={secrets.token_urlsafe(32)}\nLOG_LEVEL=info\n"
    )
    ports = {"web1": free_port(), "web2": free_port()}
    urls = {node: f"http://127.0.0.1:{port}" for node, port in ports.items()}
    netloc = MARIADB.netloc or "root@127.0.0.1:3306"
    env = dict(os.environ, GPTLOAD_ENV_FILE=str(env_file), GPTLOAD_TEST_IMAGE=IMAGE,
               GPTLOAD_TEST_DATABASE_DSN=f"mysql://{netloc}/{database}",
               GPTLOAD_TEST_REDIS_DSN=f"redis://127.0.0.1:6379/{REDIS_DB}",
               GPTLOAD_TEST_WEB1_PORT=str(ports["web1"]),
               GPTLOAD_TEST_WEB2_PORT=str(ports["web2"]))  # fmt: skip
    compose = [*base, "-p", project, "-f", str(folder / "cluster.yml"), "--profile", "cluster"]
    admin = {"Authorization": f"Bearer {admin_key}"}
    ids: dict[str, str] = {}
    try:
        merge(base, env, folder / "cluster.yml", "cluster")
        mariadb(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")
        flush_redis()
        with report.check("cluster: web1, web2, worker and beat up and healthy"):
            run(*compose, "up", "-d", "--no-build", *CLUSTER, env=env, timeout=600)
            ids = container_ids(compose, env)
            ok = within(180, lambda: all(health(ids[s]) == "healthy" for s in CLUSTER), 1)
            states = {service: health(ids[service]) for service in CLUSTER}
            print(f"    health: {states}")
            if not ok:
                for service in CLUSTER:
                    logs(ids[service], 30)
            expect(ok, f"not all healthy within 180 s: {states}")
        with report.check("cluster: /health/ready on web2 sees the worker and beat"):
            ready = httpx.get(f"{urls['web2']}/health/ready", headers=admin, timeout=10)
            checks = ready.json().get("checks", {})
            expect(ready.status_code == 200, f"/health/ready answered {ready.status_code}: "
                   f"{ready.text[:400]}")  # fmt: skip
            for role in ("database", "redis", "worker", "beat"):
                expect(checks.get(role, {}).get("status") == "up", f"{role}: {checks.get(role)}")
        proxy_key = "sk-docker-cluster-proxy-" + secrets.token_hex(8)
        with report.check("cluster: an import through web2 is run by the worker container"):
            group = httpx.post(f"{urls['web1']}/api/groups", headers=admin, timeout=10, json={
                "name": "pair", "channel_type": "openai", "test_model": "m",
                "proxy_keys": proxy_key, "upstreams": [{"url": fake.url, "weight": 1}]})  # fmt: skip
            expect(group.status_code == 200, f"group not created: {group.text}")
            group_id = group.json()["data"]["id"]
            started = httpx.post(f"{urls['web2']}/api/keys/add-async", headers=admin, timeout=30,
                                 json={"group_id": group_id, "keys_text": "bad good1 good2"})  # fmt: skip
            expect(started.status_code == 200, f"add-async answered {started.text}")
            status = wait_job(urls["web2"], admin, group_id)
            expect(status["status"] == "succeeded" and status["result"]["added_count"] == 3,
                   f"the job ended {status}")  # fmt: skip

        def call(node: str) -> httpx.Response:
            return httpx.post(f"{urls[node]}/proxy/pair/v1/chat/completions", json=CHAT,
                              headers={"Authorization": f"Bearer {proxy_key}"}, timeout=30)  # fmt: skip

        with report.check("cluster: a key benched through web1 is skipped by web2"):
            for node in ("web1", "web2"):
                expect(within(5, lambda n=node: call(n).status_code == 200),  # type: ignore[misc]
                       f"{node} does not serve the new group")  # fmt: skip
            fake.behave("bad", Behaviour(status=401))
            fake.clear()
            for _ in range(10):  # web1 meets the bad key, benches it, retries another
                answer = call("web1")
                expect(answer.status_code == 200, f"web1 answered {answer.status_code}")
                if "bad" in fake.keys_used():
                    break
            expect(fake.keys_used().count("bad") == 1, f"web1 sent {fake.keys_used()}")
            time.sleep(1.0)
            fake.clear()
            for _ in range(8):
                answer = call("web2")
                expect(answer.status_code == 200, f"web2 answered {answer.status_code}")
            used = fake.keys_used()
            print(f"    web2 sent keys {sorted(set(used))} in {len(used)} calls")
            expect("bad" not in used, "web2 tried the key web1 benched")
        with report.check(f"cluster: compose stop: every node exits 0 within {STOP_GRACE} s"):
            began = time.monotonic()
            run(*compose, "stop", *CLUSTER, env=env, timeout=300)
            took = time.monotonic() - began
            codes = {}
            for service in CLUSTER:
                state = json.loads(run("docker", "inspect", "--format", "{{json .State}}",
                                       ids[service]).stdout)  # fmt: skip
                codes[service] = state["ExitCode"]
            print(f"    stopped in {took:.1f} s, exit codes {codes}")
            bad = [service for service, code in codes.items() if code != 0]
            for service in bad:
                logs(ids[service], 30)
            expect(not bad, f"exit codes {codes}")
            expect(took < STOP_GRACE, f"the stop took {took:.1f} s")
    finally:
        run(*compose, "down", "-v", "--remove-orphans", "-t", "5", env=env, timeout=300,
            check=False)  # fmt: skip
        with contextlib.suppress(Exception):
            mariadb(f"DROP DATABASE IF EXISTS `{database}`")
        with contextlib.suppress(Exception):
            flush_redis()
        shutil.rmtree(folder, ignore_errors=True)


def compose_default(report: Report, fake: FakeProvider, base: list[str]) -> None:
    """The Compose file's default service, with .env.example unchanged as its .env."""
    project = f"gptload-dockertest-default-{RUN_ID}"
    folder = Path(tempfile.mkdtemp(prefix="gptload-docker-default-"))
    env_file = folder / ".env"
    shutil.copy(ROOT / "docker" / ".env.example", env_file)
    data = folder / "data"  # left for Docker to make, as ./data is on a first start
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, GPTLOAD_ENV_FILE=str(env_file), GPTLOAD_TEST_IMAGE=IMAGE,
               GPTLOAD_TEST_DATA=str(data), GPTLOAD_TEST_PORT=str(port))  # fmt: skip
    compose = [*base, "-p", project, "-f", str(folder / "default.yml")]
    try:
        merge(base, env, folder / "default.yml")
        with report.check("compose default: data-owner, then gptload healthy (.env.example as is)"):
            run(*compose, "up", "-d", "--no-build", "gptload", env=env, timeout=300)
            container = run(*compose, "ps", "-q", "gptload", env=env).stdout.strip()
            owner = run(*compose, "ps", "-q", "data-owner", env=env).stdout.strip()
            ok = within(90, lambda: health(container) == "healthy", 1)
            if not ok:
                logs(container)
            expect(ok, f"gptload's health: {health(container)}")
            code = run("docker", "inspect", "--format", "{{.State.ExitCode}}", owner).stdout
            expect(code.strip() == "0", f"data-owner exited {code.strip()}")
            expect(
                data.stat().st_uid == UID, f"the data folder belongs to uid {data.stat().st_uid}"
            )
            expect((data / "gptload.db").exists(), "no SQLite database in the data folder")
        with report.check("compose default: keys via `compose exec`, import job, proxied call"):
            admin_key = run(*compose, "exec", "-T", "gptload", "python", "manage.py", "auth_key",
                            env=env).stdout.strip()  # fmt: skip
            proxy_key = run(*compose, "exec", "-T", "gptload", "python", "manage.py", "auth_key",
                            "--proxy", env=env).stdout.strip().split(",")[0]  # fmt: skip
            admin = {"Authorization": f"Bearer {admin_key}"}
            group = httpx.post(f"{url}/api/groups", headers=admin, timeout=10, json={
                "name": "compose", "channel_type": "openai", "test_model": "m",
                "upstreams": [{"url": fake.url, "weight": 1}]})  # fmt: skip
            expect(group.status_code == 200, f"group not created: {group.text}")
            group_id = group.json()["data"]["id"]
            key = f"sk-compose-{secrets.token_hex(8)}"
            started = httpx.post(f"{url}/api/keys/add-async", headers=admin, timeout=30,
                                 json={"group_id": group_id, "keys_text": key})  # fmt: skip
            expect(started.status_code == 200, f"add-async answered {started.text}")
            status = wait_job(url, admin, group_id)
            expect(status["status"] == "succeeded", f"the job ended {status}")
            fake.clear()
            answer = httpx.post(f"{url}/proxy/compose/v1/chat/completions", json=CHAT,
                                headers={"Authorization": f"Bearer {proxy_key}"},
                                timeout=30)  # fmt: skip
            expect(answer.status_code == 200, f"the proxy answered {answer.status_code}")
            expect(fake.keys_used() == [key], f"the provider saw {fake.keys_used()}")
        with report.check(f"compose default: compose stop, exit 0 within {GRACEFUL} s"):
            began = time.monotonic()
            run(*compose, "stop", "gptload", env=env, timeout=120)
            took = time.monotonic() - began
            code = run("docker", "inspect", "--format", "{{.State.ExitCode}}", container).stdout
            print(f"    stopped in {took:.1f} s, exit code {code.strip()}")
            expect(code.strip() == "0", f"exit code {code.strip()}")
            expect(took < GRACEFUL, f"the stop took {took:.1f} s")
    finally:
        run(*compose, "down", "-v", "--remove-orphans", "-t", "5", env=env, timeout=300,
            check=False)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


def compose_files_valid(report: Report, base: list[str]) -> None:
    """The Compose file alone (as users run it), both profiles, with .env.example's values."""
    with tempfile.TemporaryDirectory() as folder:
        env_file = Path(folder) / ".env"
        shutil.copy(ROOT / "docker" / ".env.example", env_file)
        env = dict(os.environ, GPTLOAD_ENV_FILE=str(env_file))
        with report.check(f"compose file valid for {' '.join(base)} (default and cluster)"):
            version = run(*base, "version", env=env).stdout.splitlines()[0]
            print(f"    {version}")
            files = ["-f", "docker/docker-compose.yml"]
            config = yaml.safe_load(run(*base, *files, "config", env=env).stdout)
            services = config["services"]
            default = sorted(name for name, service in services.items()
                             if not service.get("profiles"))  # fmt: skip
            expect(default == ["data-owner", "gptload"], f"services out of profiles: {default}")
            cluster = sorted(name for name, service in services.items()
                             if "cluster" in service.get("profiles", ()))  # fmt: skip
            expect(set(CLUSTER) | {"mysql", "redis"} == set(cluster), f"cluster: {cluster}")
            run(*base, *COMPOSE_FILES, "--profile", "cluster", "config", "-q", env=env)


def main() -> int:
    report = Report()
    base: list[str] | None = None
    try:
        with report.check("tools: docker.io, compose, debootstrap installed"):
            install_tools()
            base = compose_command()
            expect(base, "no Compose found")
        assert base is not None
        with report.check("engine: dockerd answers"):
            start_engine()
        compose_files_valid(report, base)
        with report.check(f"base image {BASE}"):
            build_base()
        with report.check(f"image {IMAGE} built (classic builder, host network)"):
            build_image()
        with FakeProvider() as fake:
            single(report, fake)
            compose_default(report, fake, base)
            cluster(report, fake, base)
    except (CheckFailed, subprocess.SubprocessError, httpx.HTTPError, OSError, KeyError):
        pass  # reported by its check
    return 0 if report.summary() else 1


if __name__ == "__main__":
    sys.exit(main())
