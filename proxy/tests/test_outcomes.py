"""The outcome matrix beyond the happy path: disconnects, overload, throttled pools,
aggregates, model lists, header rules, timeouts, our own failures, shared key states."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from django.conf import settings as django_settings

from conftest import ON_REDIS
from keys.models import APIKey, Group, GroupSubGroup, GroupType, KeyStatus
from logs.models import RequestLog
from proxy.tests.conftest import PROXY_KEY, proxy_url, wait_until
from settings_app.models import SystemSetting
from tests.fakeprovider import OPENAI_MODELS, Behaviour, full_text
from tests.forwardproxy import ForwardProxy

pytestmark = pytest.mark.django_db(transaction=True)
AUTH = {"Authorization": f"Bearer {PROXY_KEY}"}
MESSAGES: Any = [{"role": "user", "content": "hi"}]
CHAT = {"model": "m", "messages": MESSAGES}


def client(gateway: str, group: str = "openai") -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy_url(gateway, group) + "/v1", api_key=PROXY_KEY,
                         max_retries=0)  # fmt: skip


def final_rows(count: int) -> list[RequestLog]:
    rows = RequestLog.objects.filter(request_type="final")
    assert wait_until(lambda: rows.count() >= count), list(rows.values())
    return list(rows.order_by("timestamp"))


def test_a_client_leaving_mid_stream_closes_the_upstream_and_is_logged_499(
    gateway, provider, make_group
):
    make_group(keys=("slow",))
    provider.behave("slow", Behaviour(event_interval=0.3, events=10))
    url = proxy_url(gateway, "openai") + "/v1/chat/completions"
    with httpx.stream("POST", url, json={**CHAT, "stream": True}, headers=AUTH) as response:
        assert next(response.iter_bytes())
    assert provider.wait_for_disconnects(1, timeout=3)
    (row,) = final_rows(1)
    assert (row.status_code, row.is_success, row.is_stream) == (499, False, True)
    assert wait_until(lambda: APIKey.objects.get().consecutive_failures == 0)


def test_a_client_leaving_before_the_first_byte_closes_the_upstream(gateway, provider, make_group):
    make_group(keys=("late",))
    provider.behave("late", Behaviour(first_byte_delay=3))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(proxy_url(gateway, "openai") + "/v1/chat/completions", json=CHAT,
                   headers=AUTH, timeout=0.5)  # fmt: skip
    assert provider.wait_for_disconnects(1, timeout=2)
    (row,) = final_rows(1)
    assert row.status_code == 499
    assert APIKey.objects.get().status == KeyStatus.ACTIVE  # nobody's fault


def test_beyond_max_concurrent_requests_the_answer_is_429_with_retry_after(
    gateway, provider, make_group, settings
):
    settings.MAX_CONCURRENT_REQUESTS = 1
    make_group(keys=("slow",))
    provider.behave("slow", Behaviour(event_interval=0.2, events=5))
    url = proxy_url(gateway, "openai") + "/v1/chat/completions"
    with httpx.stream("POST", url, json={**CHAT, "stream": True}, headers=AUTH) as held:
        chunks = held.iter_bytes()  # kept: a dropped iterator would close the stream
        assert next(chunks)
        with pytest.raises(openai.RateLimitError) as caught:
            client(gateway).chat.completions.create(**CHAT)
        assert caught.value.response.headers["Retry-After"] == "1"
        assert b"".join(chunks).endswith(b"data: [DONE]\n\n")
    assert client(gateway).chat.completions.create(**CHAT).choices  # the slot came back


def test_a_pool_answering_429_as_a_whole_backs_the_group_off_without_benching_keys(
    gateway, provider, make_group
):
    make_group(keys=("a", "b", "c", "d"))
    provider.behave_default(Behaviour(status=429, retry_after="30"))
    with pytest.raises(openai.RateLimitError):
        client(gateway).chat.completions.create(**CHAT)
    assert len(provider.requests) == 3  # the third 429 in a row showed it is the caller
    with pytest.raises(openai.RateLimitError) as caught:
        client(gateway).chat.completions.create(**CHAT)
    assert len(provider.requests) == 3  # answered by gptload during the back-off
    assert 25 <= int(caught.value.response.headers["Retry-After"]) <= 30
    assert caught.value.code == "rate_limit_exceeded"
    time.sleep(1.2)  # past a flush of the key states
    assert set(APIKey.objects.values_list("status", flat=True)) == {KeyStatus.ACTIVE}


def make_aggregate(make_group, weights: dict[str, int]) -> Group:
    aggregate = Group.objects.create(
        name="agg", group_type=GroupType.AGGREGATE, channel_type="openai", proxy_keys=PROXY_KEY
    )
    for name, weight in weights.items():
        member = Group.objects.get(name=name)
        GroupSubGroup.objects.create(group=aggregate, sub_group=member, weight=weight)
    return aggregate


def test_an_aggregate_retries_on_another_member(gateway, provider, make_group):
    make_group(name="broken", keys=("x1",))
    make_group(name="healthy", keys=("y1",))
    provider.behave("x1", Behaviour(status=500))
    make_aggregate(make_group, {"broken": 10, "healthy": 1})
    from proxy.runtime import runtime

    runtime.invalidate()
    answer = client(gateway, "agg").chat.completions.create(**CHAT)
    assert answer.choices[0].message.content == full_text()
    assert provider.keys_used() == ["x1", "y1"]
    rows = RequestLog.objects.order_by("timestamp")
    assert wait_until(lambda: rows.count() == 2)
    assert [(r.request_type, r.group_name, r.parent_group_name, r.status_code) for r in rows] == [
        ("retry", "broken", "agg", 500),
        ("final", "healthy", "agg", 200),
    ]


def test_an_aggregate_keeps_its_members_through_a_system_settings_change(
    gateway, provider, make_group
):
    make_group(name="member", keys=("m1",))
    make_aggregate(make_group, {"member": 1})
    assert client(gateway, "agg").chat.completions.create(**CHAT).choices
    SystemSetting.objects.update_or_create(setting_key="max_retries",
                                           defaults={"setting_value": "2"})  # fmt: skip
    assert client(gateway, "agg").chat.completions.create(**CHAT).choices
    assert provider.keys_used() == ["m1", "m1"]


def test_model_lists_follow_the_redirect_rules(gateway, make_group):
    make_group(name="strict", model_redirect_rules={"alias": "gpt-4o"}, model_redirect_strict=True)
    make_group(name="loose", model_redirect_rules={"alias": "gpt-4o"})
    assert [m.id for m in client(gateway, "strict").models.list()] == ["alias"]
    assert [m.id for m in client(gateway, "loose").models.list()] == [*OPENAI_MODELS, "alias"]


def test_header_rules_fill_in_the_client_ip_and_group(gateway, provider, make_group):
    rules = [{"key": "X-Origin", "value": "${CLIENT_IP}@${GROUP_NAME}", "action": "set"},
             {"key": "X-Drop-Me", "action": "remove"}]  # fmt: skip
    make_group(keys=("k1",), header_rules=rules)
    httpx.post(proxy_url(gateway, "openai") + "/v1/chat/completions", json=CHAT,
               headers={**AUTH, "X-Forwarded-For": "203.0.113.9", "X-Drop-Me": "1"})  # fmt: skip
    received = provider.requests[0]
    # The request came from loopback, a trusted proxy by default (FORWARDED_ALLOW_IPS).
    assert received.headers["X-Origin"] == "203.0.113.9@openai"
    assert "X-Drop-Me" not in received.headers
    (row,) = final_rows(1)
    assert row.source_ip == "203.0.113.9"


def test_a_fault_of_gptloads_own_answers_500_in_the_providers_shape(
    gateway, make_group, monkeypatch
):
    make_group(keys=("k1",))

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("proxy.pipeline.choose", broken)
    with pytest.raises(openai.InternalServerError) as caught:
        client(gateway).chat.completions.create(**CHAT)
    assert caught.value.status_code == 500
    assert caught.value.body == {
        "message": "gptload failed to handle this request.",
        "type": "internal_error",
        "code": "internal_error",
    }
    assert "Traceback" not in caught.value.response.text


def test_a_request_body_that_never_arrives_gets_408(gateway, make_group, settings):
    settings.SERVER_READ_TIMEOUT = 1
    make_group()
    host, port = gateway.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /proxy/openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + PROXY_KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        began = time.monotonic()
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408")
    assert 0.8 < time.monotonic() - began < 4


@pytest.mark.skipif(not ON_REDIS, reason="key states are shared through Redis")
def test_key_states_are_shared_through_redis(gateway, provider, make_group):
    import redis

    from keys.states import KEY_STATES, KEYS_CHANNEL, SharedState

    shared = redis.Redis.from_url(django_settings.REDIS_DSN)
    group = make_group(keys=("bad", "k1", "k2"))
    provider.behave("bad", Behaviour(status=401))
    for _ in range(3):
        client(gateway).chat.completions.create(**CHAT)
    bad = APIKey.objects.with_secret(group, "bad").get()
    assert wait_until(lambda: shared.hget(KEY_STATES, str(bad.pk)) is not None)
    assert SharedState.decode(shared.hget(KEY_STATES, str(bad.pk)))[1].status == "invalid"  # type: ignore[arg-type,index]
    # Another node benches k1: this one stops using it at once.
    k1 = APIKey.objects.with_secret(group, "k1").get()
    benched = SharedState(k1.pk, group.pk, "invalid", 0.0, 0, time.time() + 1)
    shared.publish(KEYS_CHANNEL, benched.encode(node="another node"))
    time.sleep(0.3)
    provider.clear()
    for _ in range(4):
        client(gateway).chat.completions.create(**CHAT)
    assert provider.keys_used() == ["k2"] * 4


def test_gptload_waits_for_a_slow_first_byte_within_the_header_timeout(
    gateway, provider, make_group
):
    make_group(keys=("late",), config={"response_header_timeout": 5})
    provider.behave("late", Behaviour(first_byte_delay=0.5))
    done: list[str] = []
    worker = threading.Thread(
        target=lambda: done.append(client(gateway).chat.completions.create(**CHAT).id)
    )
    worker.start()
    worker.join(5)
    assert done


def test_a_change_is_in_force_before_the_call_that_made_it_returns(
    gateway, provider, make_group, admin_api
):
    group = make_group(keys=("k1",))
    client(gateway).chat.completions.create(**CHAT)
    group.param_overrides = {"temperature": 0.25}
    group.save()  # the admin, the API and the jobs all save like this
    client(gateway).chat.completions.create(**CHAT)
    assert provider.requests[-1].json.get("temperature") == 0.25
    admin_api.headers = {"Authorization": f"Bearer {PROXY_KEY}"}  # make_group's AUTH_KEY
    created = admin_api.post("/groups", {
        "name": "fresh", "channel_type": "openai", "test_model": "m", "proxy_keys": PROXY_KEY,
        "upstreams": [{"url": provider.url, "weight": 1}]})  # fmt: skip
    group_id = admin_api.data(created)["id"]
    admin_api.data(admin_api.post("/keys/add-multiple", {"group_id": group_id, "keys_text": "k9"}))
    client(gateway, "fresh").chat.completions.create(**CHAT)
    assert provider.keys_used()[-1] == "k9"


def test_large_request_bodies_are_forwarded_whole(gateway, provider, make_group):
    make_group(keys=("k1",))
    image = "A" * (6 << 20)  # a 6 MB base64 image, beyond Django's form-data limit
    content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]
    messages: Any = [{"role": "user", "content": content}]
    answer = client(gateway).chat.completions.create(model="m", messages=messages)
    assert answer.choices[0].message.content == full_text()
    assert len(provider.requests[0].body) > 6 << 20


@pytest.mark.parametrize("scheme", ["http", "socks5", "socks5h"])
def test_upstream_calls_go_through_the_groups_proxy_url(gateway, provider, make_group, scheme):
    with ForwardProxy(username="relay", password="pw-relay-0123") as relay:
        url = relay.http_url if scheme == "http" else relay.socks_url.replace("socks5", scheme, 1)
        upstream = provider.url.replace("127.0.0.1", "localhost") if scheme == "socks5h" else None
        make_group(keys=("k1",), config={"proxy_url": url},
                   **({"upstreams": [{"url": upstream, "weight": 1}]} if upstream else {}))  # fmt: skip
        answer = client(gateway).chat.completions.create(**CHAT)
        assert answer.choices[0].message.content == full_text()
        assert relay.hits
        assert relay.hits[0][0] == ("http" if scheme == "http" else "socks5")
        assert provider.requests[0].key == "k1"
        assert "Proxy-Authorization" not in provider.requests[0].headers


def test_a_stream_the_upstream_cuts_is_an_error_but_not_the_keys_fault(
    gateway, provider, make_group
):
    make_group(keys=("k1",), config={"blacklist_threshold": 1})
    provider.behave("k1", Behaviour(drop_after=2))
    seen = b""
    with pytest.raises(httpx.HTTPError), httpx.stream(  # noqa: PT012 - reading is what fails
        "POST", proxy_url(gateway, "openai") + "/v1/chat/completions",
        json={**CHAT, "stream": True}, headers={**AUTH, "Accept-Encoding": "identity"},
    ) as response:  # fmt: skip
        for chunk in response.iter_raw():
            seen += chunk
    assert seen.count(b"tok") == 2  # what came before the cut was relayed
    (row,) = final_rows(1)
    assert (row.status_code, row.is_success) == (200, False)
    assert "broke off" in row.error_message
    key = APIKey.objects.get()
    assert (key.status, key.consecutive_failures) == (KeyStatus.ACTIVE, 0)


class EndsEarly:
    """An upstream whose SSE answer ends cleanly, but before its last event."""

    def __init__(self) -> None:
        from aiohttp import web

        async def answer(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b'data: {"choices":[{"delta":{"content":"half"}}]}\n\n')
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_post("/v1/chat/completions", answer)
        self.runner = web.AppRunner(app)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_a_stream_that_ends_before_its_last_event_is_logged_truncated(gateway, make_group):
    upstream = EndsEarly()
    try:
        make_group(keys=("k1",), upstreams=[{"url": upstream.url, "weight": 1}])
        answer = httpx.post(proxy_url(gateway, "openai") + "/v1/chat/completions",
                            json={**CHAT, "stream": True}, headers=AUTH)  # fmt: skip
        assert answer.text.startswith("data: ")
    finally:
        upstream.close()
    (row,) = final_rows(1)
    assert (row.status_code, row.is_success) == (200, False)
    assert "truncated" in row.error_message
    assert APIKey.objects.get().consecutive_failures == 0
