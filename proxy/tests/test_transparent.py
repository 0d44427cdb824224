"""Bytes that match their headers: whatever the provider's Content-Encoding, the client
gets exactly what the headers it receives describe, and gptload still reads the usage.
Also what crosses the gateway and what does not: one Date, no hop-by-hop headers."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest

from logs.models import RequestLog
from proxy.tests.conftest import PROXY_KEY, proxy_url, wait_until
from tests.codings import CODINGS, decompress
from tests.fakeprovider import COMPLETION_TOKENS, PROMPT_TOKENS, Behaviour, full_text

pytestmark = pytest.mark.django_db(transaction=True)
AUTH = {"Authorization": f"Bearer {PROXY_KEY}"}
CHAT: Any = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def raw_post(gateway: str, group: str, body: Any, **headers: str) -> httpx.Response:
    """A POST whose answer is read as it came off the wire (httpx decodes nothing here)."""
    with httpx.Client(headers={**AUTH, **headers}) as client:
        request = client.build_request("POST", proxy_url(gateway, group) + "/v1/chat/completions",
                                       json=body)  # fmt: skip
        response = client.send(request, stream=True)
        response.read_raw = b"".join(response.iter_raw())  # type: ignore[attr-defined]
        response.close()
        return response


def last_row() -> RequestLog:
    rows = RequestLog.objects.all()
    assert wait_until(lambda: rows.count() >= 1)
    return rows.order_by("-timestamp").first()  # type: ignore[return-value]


@pytest.mark.parametrize("coding", CODINGS)
def test_a_compressed_answer_reaches_the_client_as_it_was_sent(
    gateway, provider, make_group, coding
):
    make_group(keys=("k1",))
    response = raw_post(gateway, "openai", CHAT, **{"Accept-Encoding": coding})
    raw = response.read_raw  # type: ignore[attr-defined]
    assert response.status_code == 200
    assert response.headers["content-encoding"] == coding
    assert int(response.headers["content-length"]) == len(raw)
    answer = json.loads(decompress(raw, coding))
    assert answer["choices"][0]["message"]["content"] == full_text()
    row = last_row()
    assert (row.prompt_tokens, row.completion_tokens) == (PROMPT_TOKENS, COMPLETION_TOKENS)


@pytest.mark.parametrize("coding", CODINGS)
def test_a_compressed_stream_is_relayed_as_it_was_sent_and_its_usage_read(
    gateway, provider, make_group, coding
):
    make_group(keys=("k1",))
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response = raw_post(gateway, "openai", body, **{"Accept-Encoding": coding})
    assert response.headers["content-encoding"] == coding
    assert "content-length" not in response.headers
    events = decompress(response.read_raw, coding)  # type: ignore[attr-defined]
    assert events.endswith(b"data: [DONE]\n\n")
    row = last_row()
    assert (row.status_code, row.is_success, row.is_stream) == (200, True, True)
    assert (row.prompt_tokens, row.completion_tokens) == (PROMPT_TOKENS, COMPLETION_TOKENS)


def test_a_compressed_error_passes_through_with_matching_bytes(gateway, provider, make_group):
    make_group(keys=("k1",))
    provider.behave("k1", Behaviour(status=404))
    response = raw_post(gateway, "openai", CHAT, **{"Accept-Encoding": "br"})
    assert response.status_code == 404
    assert response.headers["content-encoding"] == "br"
    raw = response.read_raw  # type: ignore[attr-defined]
    assert int(response.headers["content-length"]) == len(raw)
    assert json.loads(decompress(raw, "br"))["error"]["message"]


def test_a_rewritten_model_list_is_sent_plain_whatever_the_upstream_sent(
    gateway, provider, make_group
):
    make_group(keys=("k1",), model_redirect_rules={"alias": "gpt-4o-mini"})
    with httpx.Client(headers={**AUTH, "Accept-Encoding": "gzip"}) as client:
        response = client.get(proxy_url(gateway, "openai") + "/v1/models")
    assert provider.requests[-1].encoding == "gzip"  # the upstream compressed its list
    assert "content-encoding" not in response.headers
    assert "alias" in {m["id"] for m in response.json()["data"]}


def raw_exchange(gateway: str, request: bytes) -> bytes:
    host, port = gateway.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def head_lines(answer: bytes) -> list[bytes]:
    return answer.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")[1:]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_an_answer_carries_exactly_one_date_and_no_hop_by_hop_headers(
    gateway, provider, make_group, stream
):
    make_group(keys=("k1",))
    hops = {"Keep-Alive": "timeout=5", "Proxy-Authenticate": "Basic", "Trailer": "X-Sum",
            "X-Resp-Hop": "1"}  # fmt: skip
    provider.behave("k1", Behaviour(headers={**hops, "Connection": "keep-alive, X-Resp-Hop"}))
    body = json.dumps({**CHAT, "stream": stream}).encode()
    answer = raw_exchange(gateway, (
        b"POST /proxy/openai/v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        b"Authorization: Bearer " + PROXY_KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    ))  # fmt: skip
    lines = head_lines(answer)
    assert answer.startswith(b"HTTP/1.1 200")
    assert sum(line.startswith(b"date:") for line in lines) == 1
    for name in ("keep-alive", "proxy-authenticate", "trailer", "x-resp-hop"):
        assert not any(line.startswith(name.encode() + b":") for line in lines), name


def test_no_accept_encoding_from_the_client_means_none_upstream(gateway, provider, make_group):
    make_group(keys=("k1",))
    body = json.dumps(CHAT).encode()
    answer = raw_exchange(gateway, (
        b"POST /proxy/openai/v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        b"Authorization: Bearer " + PROXY_KEY.encode() + b"\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\n\r\n" + body
    ))  # fmt: skip
    assert "accept-encoding" not in provider.requests[-1].headers
    assert not any(line.startswith(b"content-encoding:") for line in head_lines(answer))
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["choices"]


def test_hop_by_hop_request_headers_never_reach_the_upstream(gateway, provider, make_group):
    make_group(keys=("k1",))
    body = json.dumps(CHAT).encode()
    raw_exchange(gateway, (
        b"POST /proxy/openai/v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        b"Authorization: Bearer " + PROXY_KEY.encode() + b"\r\n"
        b"Connection: close, X-Client-Hop\r\nX-Client-Hop: secret\r\nKeep-Alive: timeout=9\r\n"
        b"TE: trailers\r\nProxy-Authorization: Basic c2VjcmV0\r\nX-Kept: yes\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\n\r\n" + body
    ))  # fmt: skip
    seen = provider.requests[-1].headers
    for name in ("x-client-hop", "keep-alive", "te", "proxy-authorization"):
        assert name not in seen, name
    assert seen["x-kept"] == "yes"
    assert seen["authorization"] == "Bearer k1"
