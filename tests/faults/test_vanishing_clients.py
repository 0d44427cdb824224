"""Clients that go away at random points: while gptload waits for the upstream's headers,
midway through a plain answer gptload is still reading, midway through a stream, and
while still sending their own request body. Some close, some reset the connection.

The server must stay healthy: each request that reached the upstream gets exactly one
final log row (499 where the client left before the answer's end), its upstream request
is closed, its key is not charged, no slot of `MAX_CONCURRENT_REQUESTS` stays taken, and
the next call succeeds. A request whose body never arrived reaches neither the upstream
nor the log.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from proxy.tests.conftest import PROXY_KEY
from tests.fakeprovider import Behaviour
from tests.faults.conftest import MAX_CONCURRENT, Gateway, eventually
from tests.faults.tally import Tally

PER_KIND = 6  # clients of each kind, all at once (18 in flight: below MAX_CONCURRENT)
KINDS = {
    # kind: what the upstream does for that group's key
    "before headers": Behaviour(first_byte_delay=5),
    "mid plain body": Behaviour(body_delay=5),
    "mid stream": Behaviour(events=10, event_interval=0.05),
    "mid request body": Behaviour(),
}


@dataclass
class Client:
    kind: str
    group: str
    tag: str  # the query that names this request in its log row
    saw_end: bool = False  # the whole answer arrived before it left


def request_head(gateway: Gateway, client: Client, body: bytes, length: int) -> bytes:
    return (f"POST /proxy/{client.group}/v1/chat/completions?n={client.tag} HTTP/1.1\r\n"
            f"Host: gw\r\nAuthorization: Bearer {PROXY_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode() + body  # fmt: skip


def vanish(sock: socket.socket, reset: bool) -> None:
    if reset:  # RST rather than FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def run(gateway: Gateway, client: Client, rng: random.Random) -> None:
    stream = client.kind == "mid stream"
    body = b'{"model": "m", "messages": [], "stream": %s}' % (b"true" if stream else b"false")
    sock = socket.create_connection(("127.0.0.1", gateway.server.port), timeout=10)
    reset = rng.random() < 0.5
    if client.kind == "mid request body":
        sock.sendall(request_head(gateway, client, body[:10], 5000))
        time.sleep(rng.uniform(0.01, 0.2))
        vanish(sock, reset)
        return
    sock.sendall(request_head(gateway, client, body, len(body)))
    if not stream:
        time.sleep(rng.uniform(0.05, 0.6))  # the upstream holds its headers or body 5 s
        vanish(sock, reset)
        return
    wanted = rng.randint(0, 14)  # events to read before leaving; 10 or more: all of them
    seen = b""
    while seen.count(b"\ndata: ") < wanted and b"[DONE]" not in seen:
        chunk = sock.recv(65536)
        if not chunk:
            break
        seen += chunk
    client.saw_end = b"[DONE]" in seen
    vanish(sock, reset)


def test_clients_that_vanish_at_random_points_leave_the_server_healthy(
    gateway: Gateway, tally: Tally
) -> None:
    seed = random.randrange(1 << 32)
    print(f"random seed {seed}")  # shown when the test fails, to replay it
    rng = random.Random(seed)
    groups = {}
    for kind, behaviour in KINDS.items():
        key = f"sk-vanish-{uuid.uuid4().hex[:12]}"
        groups[kind] = gateway.group([key, key + "-2"])
        gateway.fake.behave(key, behaviour)
        gateway.fake.behave(key + "-2", behaviour)
    clients = [Client(kind, groups[kind], uuid.uuid4().hex[:10])
               for kind in KINDS for _ in range(PER_KIND)]  # fmt: skip
    rng.shuffle(clients)
    seeds = [rng.randrange(1 << 32) for _ in clients]
    with ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(lambda c, s: run(gateway, c, random.Random(s)), clients, seeds))
    reached = [c for c in clients if c.kind != "mid request body"]
    tally.requests += len(clients)
    tally.rows_expected += len(reached)

    # Every upstream request of a client that left is closed: none is still being answered.
    assert eventually(lambda: gateway.fake.in_progress == 0, 15), gateway.fake.in_progress
    rows = {kind: gateway.wait_logs(group, PER_KIND if kind != "mid request body" else 0)
            for kind, group in groups.items()}  # fmt: skip
    by_tag: dict[str, list[dict[str, object]]] = {}
    for row in (row for found in rows.values() for row in found):
        by_tag.setdefault(str(row["request_path"]).rsplit("?n=", 1)[-1], []).append(row)
    tally.rows_lost += sum(1 for c in reached if c.tag not in by_tag)
    for client in clients:
        found = by_tag.get(client.tag, [])
        if client.kind == "mid request body":  # never forwarded, so never logged
            assert found == [], client
            assert not [r for r in gateway.fake.requests if r.query.get("n") == client.tag]
            continue
        assert len(found) == 1, (client, found)  # exactly one row, and it is final
        (row,) = found
        assert row["request_type"] == "final", (client, row)
        if client.saw_end:
            assert (row["status_code"], row["is_success"]) == (200, True), (client, row)
        elif client.kind == "mid stream":  # it left as the last event went out, or before
            assert row["status_code"] in (200, 499), (client, row)
        else:
            assert (row["status_code"], row["is_success"]) == (499, False), (client, row)
            assert row["error_message"] == "client disconnected", (client, row)
    assert any(row["status_code"] == 499 for found in rows.values() for row in found)
    for group in groups.values():  # nobody's fault: no key charged
        for state in gateway.keys(group).values():
            assert (state["status"], state["consecutive_failures"]) == ("active", 0), state

    # The server is healthy: its log buffer empty, nothing dropped, every slot free again.
    health = gateway.health()
    assert health["status"] == "healthy", health
    assert eventually(lambda: gateway.health()["request_log"]["waiting"] == 0)
    assert gateway.health()["request_log"]["dropped"] == 0
    lasting = f"sk-hold-{uuid.uuid4().hex[:12]}"
    holding = gateway.group([lasting])
    gateway.fake.behave(lasting, Behaviour(events=3, event_interval=5))  # streams that last
    held = hold_every_slot(gateway, holding)
    tally.requests += len(held) + 1
    tally.errors_with_healthy_key += sum(status != 200 for status in held)
    assert held == [200] * MAX_CONCURRENT, held  # no slot leaked
    follow_up = httpx.post(gateway.proxy(groups["mid stream"]) + "/v1/chat/completions",
                           json={"model": "m", "messages": []},
                           headers={"Authorization": f"Bearer {PROXY_KEY}"}, timeout=10)  # fmt: skip
    tally.errors_with_healthy_key += follow_up.status_code != 200
    assert follow_up.status_code == 200, follow_up.text
    tally.rows_expected += len(held) + 1
    logged = len(gateway.wait_logs(holding, len(held)))
    logged += len(gateway.wait_logs(groups["mid stream"], PER_KIND + 1)) - PER_KIND
    tally.rows_lost += max(0, len(held) + 1 - logged)
    assert logged == len(held) + 1


def hold_every_slot(gateway: Gateway, group: str) -> list[int]:
    """Opens MAX_CONCURRENT streams at once and holds them until all have their status
    (a slot still taken by a vanished client makes one of them a 429); then leaves them."""
    statuses: list[int] = []
    lock = threading.Lock()
    everyone = threading.Barrier(MAX_CONCURRENT)

    def hold() -> None:
        with httpx.stream("POST", gateway.proxy(group) + "/v1/chat/completions",
                          json={"model": "m", "messages": [], "stream": True},
                          headers={"Authorization": f"Bearer {PROXY_KEY}"}, timeout=10) as answer:  # fmt: skip
            with lock:
                statuses.append(answer.status_code)
            everyone.wait(15)  # every stream open at once before any is left

    with ThreadPoolExecutor(MAX_CONCURRENT) as pool:
        list(pool.map(lambda _: hold(), range(MAX_CONCURRENT)))
    return statuses
