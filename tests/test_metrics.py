"""`/metrics` as a scraper sees it: the AUTH_KEY asked for, the database's figures exact,
and, served by two web workers, the counts of both in whichever worker answers."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN_KEY, ON_MYSQL, ROOT, free_port
from keys.models import APIKey, Group, JobKind, JobStatus, KeyJob, KeyStatus
from tests.fakeprovider import FakeProvider

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROXY_KEY = "sk-metrics-proxy-0123456789"
CHAT: Any = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def figures(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


@pytest.mark.django_db
def test_metrics_need_the_auth_key(client, admin_api):
    assert client.get("/metrics").status_code == 401
    refused = client.get("/metrics", headers={"Authorization": "Bearer sk-not-it"})
    assert refused.status_code == 401
    assert refused["WWW-Authenticate"].startswith("Bearer")
    assert b"gptload_" not in refused.content
    assert client.get("/metrics", headers=ADMIN).status_code == 200


@pytest.mark.django_db
def test_keys_and_jobs_are_counted_from_the_database(client, admin_api):
    group = Group.objects.create(name="scraped", channel_type="openai", test_model="m",
                                 upstreams=[{"url": "https://example.com", "weight": 1}])  # fmt: skip
    for number, status in enumerate([KeyStatus.ACTIVE] * 3 + [KeyStatus.INVALID] * 2):
        key = APIKey.build(group, f"sk-scraped-{number:04d}")
        key.status = status
        key.save()
    for job_status in (JobStatus.SUCCEEDED, JobStatus.SUCCEEDED, JobStatus.FAILED):
        KeyJob.objects.create(kind=JobKind.IMPORT, group=group, status=job_status)
    found = figures(client.get("/metrics", headers=ADMIN).content.decode())
    assert value(found, "gptload_keys", group="scraped", state="active") == 3
    assert value(found, "gptload_keys", group="scraped", state="invalid") == 2
    assert value(found, "gptload_keys", group="scraped", state="cooling") == 0
    assert value(found, "gptload_key_jobs", kind="import", status="succeeded") == 2
    assert value(found, "gptload_key_jobs", kind="import", status="failed") == 1
    assert value(found, "gptload_key_jobs", kind="validate", status="running") == 0
    assert value(found, "gptload_database_up") == 1


def metrics_folder(store_env: dict[str, str], server: Any) -> Path:
    """Where `serve` keeps its workers' metric files: STATE_DIR/metrics/<its pid>."""
    state = (
        ROOT / "data"
        if ON_MYSQL
        else Path(store_env["DATABASE_DSN"].removeprefix("sqlite:///")).parent
    )
    return state / "metrics" / str(server.process.pid)


def workers_counting(folder: Path, group: str) -> set[str]:
    """The web workers (by pid) whose own files count requests to `group`."""
    counting = set()
    for file in folder.glob("counter_*.db"):
        for family in MultiProcessCollector.merge([str(file)], accumulate=False):
            if any(s.labels.get("group") == group and s.value > 0 for s in family.samples
                   if family.name == "gptload_requests"):  # fmt: skip
                counting.add(file.stem.rsplit("_", 1)[1])
    return counting


def test_two_web_workers_answer_with_the_counts_of_both(serve, store_env):
    port = free_port()
    server = serve(sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port",
                   str(port), "--no-worker", env={"AUTH_KEY": ADMIN_KEY, "WEB_CONCURRENCY": "2"},
                   port=port)  # fmt: skip
    server.wait_ready()
    name = f"mw-{uuid.uuid4().hex[:8]}"
    with FakeProvider() as fake:
        group = httpx.post(f"{server.url}/api/groups", headers=ADMIN, json={
            "name": name, "channel_type": "openai", "test_model": "m", "proxy_keys": PROXY_KEY,
            "upstreams": [{"url": fake.url, "weight": 1}]}).json()["data"]  # fmt: skip
        httpx.post(f"{server.url}/api/keys/add-multiple", headers=ADMIN,
                   json={"group_id": group["id"], "keys_text": "k1"})  # fmt: skip
        folder = metrics_folder(store_env, server)
        calls = 0
        # Calls on fresh connections until each worker has taken some (the kernel decides).
        while calls < 300 and len(workers_counting(folder, name)) < 2:
            for _ in range(10):
                answer = httpx.post(f"{server.url}/proxy/{name}/v1/chat/completions",
                                    json=CHAT, headers={"Authorization": f"Bearer {PROXY_KEY}"})  # fmt: skip
                assert answer.status_code == 200, answer.text
                calls += 1
            time.sleep(1.2)  # each worker hands its counts over once a second
        assert len(workers_counting(folder, name)) == 2
    ok = {"group": name, "provider": "openai", "status": "200", "outcome": "success"}

    def scrape() -> dict[Any, float]:  # a new connection each: either worker may answer
        return figures(httpx.get(server.url + "/metrics", headers=ADMIN).text)

    deadline = time.monotonic() + 15  # the last calls' counts handed over
    while time.monotonic() < deadline and value(scrape(), "gptload_requests_total", **ok) != calls:
        time.sleep(0.3)
    for _ in range(8):
        found = scrape()
        assert value(found, "gptload_requests_total", **ok) == calls
        timed = {"group": name, "stream": "false"}
        assert value(found, "gptload_request_duration_seconds_count", **timed) == calls
        assert value(found, "gptload_keys", group=name, state="active") == 1
    assert httpx.get(server.url + "/metrics").status_code == 401
    server.stop()
    assert not folder.exists()  # serve removes its metric files when it stops
    counted_apart = "each worker counts access key limits" in server.output()
    assert counted_apart == (not store_env.get("REDIS_DSN"))  # serve says so, without Redis
