"""Stores going away under a running node: the proxy keeps serving on what it holds."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from conftest import ADMIN_KEY, ON_MYSQL, free_port, manage
from tests.fakeprovider import Behaviour, FakeProvider

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROXY_KEY = "sk-resilient-proxy-0123456789"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class RedisServer:
    """A private redis-server on a loopback port, to stop and start at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def setup_group(node: Any, upstream: str, name: str) -> None:
    group = httpx.post(f"{node.url}/api/groups", headers=ADMIN, json={
        "name": name, "channel_type": "openai", "test_model": "m", "proxy_keys": PROXY_KEY,
        "upstreams": [{"url": upstream, "weight": 1}]}).json()["data"]  # fmt: skip
    added = httpx.post(f"{node.url}/api/keys/add-multiple", headers=ADMIN,
                       json={"group_id": group["id"], "keys_text": "bad k1 k2"})  # fmt: skip
    assert added.status_code == 200, added.text


def call(node: Any, name: str) -> int:
    url = f"{node.url}/proxy/{name}/v1/chat/completions"
    return httpx.post(url, json=CHAT, headers={"Authorization": f"Bearer {PROXY_KEY}"},
                      timeout=10).status_code  # fmt: skip


def eventually(check: Any, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_the_proxy_serves_through_a_redis_outage_and_shares_again_after(serve, private_redis):
    with FakeProvider() as fake:
        node = serve(env={"AUTH_KEY": ADMIN_KEY, "REDIS_DSN": private_redis.url})
        node.wait_ready()
        name = f"res{time.monotonic_ns()}"
        setup_group(node, fake.url, name)
        assert eventually(lambda: call(node, name) == 200)
        private_redis.stop()
        assert [call(node, name) for _ in range(5)] == [200] * 5  # on local state
        assert httpx.get(f"{node.url}/health").status_code == 503  # and says what is down
        private_redis.start()
        fake.behave("bad", Behaviour(status=401))
        shared = redis.Redis.from_url(private_redis.url)
        # Back: a key benched now is shared again (the listener reconnected).
        assert eventually(
            lambda: call(node, name) == 200 and bool(shared.hlen("gptload:key-states"))
        )
        assert httpx.get(f"{node.url}/health").status_code == 200


class TcpRelay:
    """Relays a loopback port to `target`; `cut()` drops every connection and refuses new
    ones until `restore()`: a database server going away, as the client sees it."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: set[socket.socket] = set()
        self.cut_off = False
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_off:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.cut_off = True
        with self.lock:
            for end in self.open:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
            self.open.clear()

    def restore(self) -> None:
        self.cut_off = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.mark.skipif(not ON_MYSQL, reason="a SQLite file does not go away; a database server can")
def test_the_proxy_serves_through_a_database_outage_and_loses_no_log_row(serve, store_env):
    from django.conf import settings as django_settings

    db = django_settings.DATABASES["default"]
    relay = TcpRelay(db["HOST"] or "127.0.0.1", int(db["PORT"] or 3306))
    name_of_db = store_env["DATABASE_DSN"].rsplit("/", 1)[1]
    user = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    dsn = f"mysql://{user}@127.0.0.1:{relay.port}/{name_of_db}"
    try:
        with FakeProvider() as fake:
            node = serve(env={"AUTH_KEY": ADMIN_KEY, "DATABASE_DSN": dsn})
            node.wait_ready()
            name = f"dbres{time.monotonic_ns()}"
            setup_group(node, fake.url, name)
            settings_put = httpx.put(f"{node.url}/api/settings", headers=ADMIN,
                                     json={"request_log_write_interval_minutes": 0})  # fmt: skip
            assert settings_put.status_code == 200, settings_put.text
            assert eventually(lambda: call(node, name) == 200)
            time.sleep(1.5)  # the first row is written; the snapshot is current
            relay.cut()
            assert [call(node, name) for _ in range(8)] == [200] * 8  # from the snapshot
            expected = str(len(fake.requests))  # one log row per upstream attempt
            time.sleep(1.0)  # the writer tries, fails, keeps the rows
            relay.restore()
            count = "from logs.models import RequestLog; " \
                f"print(RequestLog.objects.filter(group_name='{name}').count())"  # fmt: skip

            def written() -> bool:
                result = manage("shell", "-c", count, env={**store_env, "AUTH_KEY": ADMIN_KEY})
                return result.stdout.split()[-1:] == [expected]

            assert eventually(written, seconds=30)
    finally:
        relay.close()
