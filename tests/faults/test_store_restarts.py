"""Redis, then the database, stopped and started again while clients call
without pause. The proxy serves on what it holds in memory: no client may see an error
(every key is healthy), and every call's log row must be written once the database is
back (none lost). Both run on servers of the test's own (a private redis-server, a
private mariadbd), never on the machine's shared ones.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import ON_MYSQL
from proxy.tests.conftest import PROXY_KEY
from tests.fakeprovider import FakeProvider, full_text
from tests.faults.conftest import (
    Gateway,
    PrivateMariaDB,
    PrivateRedis,
    eventually,
    private_env,
    start_gateway,
)
from tests.faults.tally import Tally

CLIENTS = 4  # threads calling at once, plain and streamed calls in turn
PAUSE = 0.05  # seconds between one client's calls: a steady load, not a flood
MESSAGES: Any = [{"role": "user", "content": "hi"}]


class Load:
    """Clients calling a group without pause until `stop()`; counts what they sent and
    what failed (with the first failures, to show)."""

    def __init__(self, gateway: Gateway, group: str) -> None:
        self.base = gateway.proxy(group) + "/v1"
        self.sent = 0
        self.failed: list[str] = []
        self.lock = threading.Lock()
        self.running = True
        self.threads = [threading.Thread(target=self.run, args=(n,)) for n in range(CLIENTS)]
        for thread in self.threads:
            thread.start()

    def run(self, number: int) -> None:
        client = openai.OpenAI(base_url=self.base, api_key=PROXY_KEY, max_retries=0, timeout=30)
        stream = bool(number % 2)
        while self.running:
            time.sleep(PAUSE)
            try:
                text = ask(client, stream)
                error = "" if text == full_text() else f"incomplete answer {text!r}"
            except Exception as exc:  # the client's view of whatever went wrong
                error = repr(exc)
            with self.lock:
                self.sent += 1
                if error:
                    self.failed.append(error)
            stream = not stream

    def stop(self) -> None:
        self.running = False
        for thread in self.threads:
            thread.join(60)


def ask(client: openai.OpenAI, stream: bool) -> str:
    if not stream:
        answer = client.chat.completions.create(model="m", messages=MESSAGES)
        return str(answer.choices[0].message.content)
    chunks = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    return "".join((c.choices[0].delta.content or "") if c.choices else "" for c in chunks)


def until_sent(load: Load, more: int) -> None:
    """Waits until the clients have sent `more` calls (bounded: they must not hang)."""
    target = load.sent + more
    assert eventually(lambda: load.sent >= target, 30, 0.02), (load.sent, load.failed[:3])


@pytest.fixture
def loaded_gateway(store_env: dict[str, str], fake: FakeProvider, tmp_path: Path) -> Iterator[Any]:
    """Starts a gateway on the given environment, and stops it after the test."""
    started: list[Gateway] = []

    def start(**extra: str) -> Gateway:
        gateway = start_gateway(private_env(store_env, tmp_path, **extra),
                                tmp_path / f"serve{len(started)}.log", fake)  # fmt: skip
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.server.stop()


def check_nothing_lost(gateway: Gateway, group: str, load: Load, tally: Tally) -> None:
    tally.requests += load.sent
    tally.errors_with_healthy_key += len(load.failed)
    tally.rows_expected += load.sent
    assert load.failed == [], load.failed[:5]
    # Rows kept in memory while a store was away are written once it is back (the writer
    # tries again every few seconds).
    rows = gateway.wait_logs(group, load.sent, 40)
    tally.rows_lost += max(0, load.sent - len(rows))
    assert len(rows) == load.sent
    assert all(row["status_code"] == 200 and row["request_type"] == "final" for row in rows)
    assert eventually(lambda: gateway.health()["status"] == "healthy", 20), gateway.health()
    assert gateway.health()["request_log"]["dropped"] == 0


def test_redis_stopped_and_restarted_under_load_costs_no_call_and_no_row(
    loaded_gateway: Any, private_redis: PrivateRedis, tally: Tally
) -> None:
    gateway = loaded_gateway(REDIS_DSN=private_redis.url)
    group = gateway.group([f"sk-load-{uuid.uuid4().hex[:12]}", f"sk-load-{uuid.uuid4().hex[:12]}"])
    load = Load(gateway, group)
    try:
        until_sent(load, 10)
        private_redis.kill()
        assert eventually(lambda: gateway.health()["status"] == "unhealthy", 10)
        until_sent(load, 20)  # served on local state while Redis is away
        private_redis.start()
        until_sent(load, 20)
    finally:
        load.stop()
    check_nothing_lost(gateway, group, load, tally)


@pytest.mark.skipif(not ON_MYSQL, reason="a SQLite file cannot be stopped; on MariaDB it can")
def test_the_database_stopped_and_restarted_under_load_costs_no_call_and_no_row(
    loaded_gateway: Any, private_mariadb: PrivateMariaDB, store_env: dict[str, str],
    tally: Tally,
) -> None:  # fmt: skip
    name = f"gptload_faults_{uuid.uuid4().hex[:8]}"
    private_mariadb.copy_database(store_env["DATABASE_DSN"], name)
    gateway = loaded_gateway(DATABASE_DSN=private_mariadb.dsn(name))
    group = gateway.group([f"sk-load-{uuid.uuid4().hex[:12]}", f"sk-load-{uuid.uuid4().hex[:12]}"])
    load = Load(gateway, group)
    try:
        until_sent(load, 10)
        private_mariadb.stop()
        assert eventually(lambda: gateway.health()["status"] == "unhealthy", 10)
        until_sent(load, 20)  # served from the snapshot while the database is away
        time.sleep(1)  # a write-behind of key states and a log batch fail meanwhile
        private_mariadb.start()
        until_sent(load, 20)
    finally:
        load.stop()
    check_nothing_lost(gateway, group, load, tally)
