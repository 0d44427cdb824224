"""Upstream keys never reach a client, a log row, a server log line or a job result whole.

Each upstream key style (Bearer for OpenAI, `x-api-key` for Anthropic, `?key=` for
Gemini, `x-goog-api-key` through a header rule) goes through each path where an upstream
text travels on: an error passed through to the client, an error answering a stream, an
error event inside a stream, failover, a transport error, and the validation job. The
upstream quotes the key whole in every answer; then every output is searched for it, with
the server logging at debug level (every library's lines included).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any

import httpx

from conftest import ADMIN_KEY, SQLITE_PASS, free_port
from proxy.tests.conftest import PROXY_KEY, proxy_url
from tests.fakeprovider import Behaviour, FakeProvider

pytestmark = SQLITE_PASS  # masking is the same whatever stores the rows

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROXY = {"Authorization": f"Bearer {PROXY_KEY}"}


def quoting(key: str, status: int) -> Behaviour:
    """An upstream whose error names the key it was sent, whole."""
    body = json.dumps({"error": {"message": f"Key {key} is not allowed here.", "type": "x",
                                 "code": status}}).encode()  # fmt: skip
    return Behaviour(status=status, body=body)


CALLS: dict[str, tuple[str, dict[str, Any]]] = {  # channel: (path, body)
    "openai": (
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    ),
    "anthropic": (
        "/v1/messages",
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
    ),
    "gemini": ("/v1beta/models/m:generateContent", {"contents": [{"parts": [{"text": "hi"}]}]}),
}


def test_no_output_ever_holds_an_upstream_key(serve):
    port = free_port()
    server = serve(sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--worker", env={"AUTH_KEY": ADMIN_KEY, "LOG_LEVEL": "debug"}, port=port)  # fmt: skip
    server.wait_ready()
    outputs: list[str] = []  # everything a client, the API or the job showed
    secrets: list[str] = []
    with FakeProvider() as fake, httpx.Client(timeout=30) as http:
        assert http.put(f"{server.url}/api/settings", headers=ADMIN,
                        json={"request_log_write_interval_minutes": 0}).status_code == 200  # fmt: skip

        def group(channel: str, keys: list[str], **fields: Any) -> tuple[str, int]:
            name = f"mask-{channel}-{uuid.uuid4().hex[:6]}"
            made = http.post(f"{server.url}/api/groups", headers=ADMIN, json={
                "name": name, "channel_type": channel, "test_model": "m", "proxy_keys": PROXY_KEY,
                "upstreams": [{"url": fake.url, "weight": 1}], **fields})  # fmt: skip
            assert made.status_code == 200, made.text
            group_id = made.json()["data"]["id"]
            added = http.post(f"{server.url}/api/keys/add-multiple", headers=ADMIN,
                              json={"group_id": group_id, "keys_text": "\n".join(keys)})  # fmt: skip
            assert added.status_code == 200, added.text
            secrets.extend(k for k in keys if k)
            return name, group_id

        def call(name: str, channel: str, stream: bool = False, **headers: str) -> httpx.Response:
            path, body = CALLS[channel]
            if stream:
                body = {**body, "stream": True}
                if channel == "gemini":
                    path = path.replace("generateContent", "streamGenerateContent")
            answer = http.post(proxy_url(server.url, name) + path, json=body,
                               headers={**PROXY, **headers})  # fmt: skip
            outputs.append(f"{answer.status_code} {answer.headers} {answer.text}")
            return answer

        styles = {
            "openai": "openai",
            "anthropic": "anthropic",
            "gemini": "gemini",
            "goog": "openai",
        }
        for style, channel in styles.items():
            keys = [f"{style}-secret-{n}-{uuid.uuid4().hex}" for n in range(6) if n != 2]
            keys.insert(2, "")
            rules = ([{"key": "x-goog-api-key", "value": "${API_KEY}", "action": "set"},
                      {"key": "Authorization", "action": "remove"}] if style == "goog" else [])  # fmt: skip
            # Key 0 passes a 422 on, answers a stream with an error and puts an error event
            # inside a stream; 3 fails over (to 5); 4 resets the connection; 1 is refused
            # to the end (all keys failed), then checked by the validation job.
            name, group_id = group(channel, keys[:1], header_rules=rules)
            fake.behave(keys[0], quoting(keys[0], 422))
            assert call(name, channel).status_code == 422
            assert (
                call(name, channel, stream=True).status_code == 422
            )  # an error answering a stream
            fake.behave(keys[0], Behaviour(status=200, body=(
                f'data: {{"error": {{"message": "Key {keys[0]} ran out"}}}}\n\n').encode()))  # fmt: skip
            inside = call(name, channel, stream=True, **{"Accept-Encoding": "identity"})
            assert inside.status_code == 200
            assert "ran out" in inside.text
            # Failover: the first key quotes itself in a 401, the next one answers.
            name, group_id = group(channel, keys[3:4] + keys[5:6], header_rules=rules)
            fake.behave(keys[3], quoting(keys[3], 401))
            for _ in range(2):
                call(name, channel)
            # A transport error, then every key failing: the client gets the last failure.
            name, group_id = group(channel, keys[4:5], header_rules=rules)
            fake.behave(keys[4], Behaviour(reset=True))
            assert call(name, channel).status_code == 502
            name, group_id = group(channel, keys[1:2], header_rules=rules)
            fake.behave(keys[1], quoting(keys[1], 401))
            assert call(name, channel).status_code == 401
            # The validation job, on a key that answers with itself quoted.
            started = http.post(f"{server.url}/api/keys/validate-group", headers=ADMIN,
                                json={"group_id": group_id})  # fmt: skip
            assert started.status_code == 200, started.text
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                status = http.get(f"{server.url}/api/tasks/status", headers=ADMIN).json()["data"]
                if not status.get("is_running"):
                    break
                time.sleep(0.3)
            outputs.append(json.dumps(status))
            listed = http.get(f"{server.url}/api/keys?group_id={group_id}", headers=ADMIN).json()
            outputs.extend(str(k.get("last_error", "")) for k in listed["data"]["items"])

        # The log rows (written as they come: the interval is 0), then the server's output.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            logs = http.get(f"{server.url}/api/logs?page_size=1000", headers=ADMIN).json()["data"]
            if len(logs["items"]) >= 4 * 8:
                break
            time.sleep(0.3)
        assert len(logs["items"]) >= 4 * 8
        outputs.append(json.dumps(logs))
        server.stop()
        outputs.append(server.output())  # stdout and stderr, at debug level
    leaked = [key for key in secrets for text in outputs if key in text]
    assert leaked == []
    shown = "\n".join(outputs)
    assert "…" in shown  # masked copies were there to find: the test looked at real texts
