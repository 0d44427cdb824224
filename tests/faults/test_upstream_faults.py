"""Upstream faults, seen through the real SDKs against a served gptload.

Each test gives a group two keys: the first, tried first, meets the fault; the second is
healthy. For each fault it checks what the client sees, what the fault did to the key
(as /api/keys shows it) and the log rows (as /api/logs shows them). A fault met before
any byte reached the client must end in the client's success: the target is no error a
client sees while its group has a healthy key. A fault met after (a stream cut midway)
cannot be tried again; the client must then see a broken answer, never a complete one.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import openai
import pytest
from google.genai import errors as genai_errors

from conftest import ON_MYSQL
from proxy.tests.conftest import PROXY_KEY
from proxy.tests.test_sdk_matrix import call, claude, openai_chat, openai_responses
from tests.codings import decompress
from tests.fakeprovider import (
    COMPLETION_TOKENS,
    MALFORMED_EVENTS,
    PROMPT_TOKENS,
    Behaviour,
    full_text,
)
from tests.faults.conftest import Gateway, eventually
from tests.faults.tally import Tally

# How the proxy meets an upstream's faults does not depend on the store; the key states it
# leaves are shared through Redis on the other pass, which proxy/tests/test_outcomes.py and
# tests/test_cluster.py check there. Run once, on the SQLite pass (make test's budget).
pytestmark = pytest.mark.skipif(ON_MYSQL, reason="upstream faults run on the SQLite pass")

Client = tuple[str, bool]  # the group's channel, streamed or not
PLAIN: list[Client] = [("openai", False), ("anthropic", False), ("gemini", False)]
STREAMED: list[Client] = [("openai", True), ("openai-response", True), ("anthropic", True),
                          ("gemini", True)]  # fmt: skip
EVERY_SDK = PLAIN + STREAMED
OPENAI: list[Client] = [("openai", False), ("openai", True)]
EACH_SDK: list[Client] = [*OPENAI, ("anthropic", True), ("gemini", False)]
HANG = {"request_timeout": 1, "response_header_timeout": 1}  # seconds, the least allowed


@dataclass
class Outcome:
    """One client's call through its own group: the text it got or what it raised."""

    client: Client
    group: str
    bad: str
    good: str
    text: str | None = None
    error: BaseException | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.client[0]} {'stream' if self.client[1] else 'plain'}"


# One HTTP client per SDK for every call: an SDK client made with its own takes tens of
# milliseconds of CPU to set up (its TLS context), each time.
HTTP = {"openai": openai.DefaultHttpxClient(), "anthropic": anthropic.DefaultHttpxClient()}


def sdk_call(base: str, client: Client) -> str:
    """The answer text as the SDK for the client's channel assembles it, sync."""
    channel, stream = client
    sdk: Any
    if channel in ("openai", "openai-response"):
        sdk = openai.OpenAI(base_url=base + "/v1", api_key=PROXY_KEY, max_retries=0,
                            timeout=30, http_client=HTTP["openai"])  # fmt: skip
        ask = openai_chat if channel == "openai" else openai_responses
        return asyncio.run(ask(sdk, False, stream))
    if channel == "anthropic":
        sdk = anthropic.Anthropic(base_url=base, api_key=PROXY_KEY, max_retries=0, timeout=30,
                                  http_client=HTTP["anthropic"])  # fmt: skip
        return asyncio.run(claude(sdk, False, stream))
    return asyncio.run(call(channel, base, "sync", stream))


def run_clients(
    gateway: Gateway, clients: list[Client], behaviour: Behaviour, rows: int, **config: Any
) -> list[Outcome]:
    """Each client calls through a group of its own, [bad, good], all at once; the bad
    key meets `behaviour`. Each outcome carries its group's log rows, once there are
    `rows` of them (or what there is after a while, for the test to compare)."""
    outcomes = []
    for client in clients:
        tag = uuid.uuid4().hex[:12]
        outcomes.append(Outcome(client, "", f"sk-bad-{tag}", f"sk-good-{tag}"))

    def run(outcome: Outcome) -> None:
        outcome.group = gateway.group([outcome.bad, outcome.good], outcome.client[0], **config)
        gateway.fake.behave(outcome.bad, behaviour)
        try:
            outcome.text = sdk_call(gateway.proxy(outcome.group), outcome.client)
        except Exception as exc:  # what the SDK raised is the client's view of the fault
            outcome.error = exc
        outcome.rows = gateway.wait_logs(outcome.group, rows)

    with ThreadPoolExecutor(len(outcomes)) as pool:
        list(pool.map(run, outcomes))
    return outcomes


def key_of(gateway: Gateway, outcome: Outcome, secret: str) -> dict[str, Any]:
    return gateway.keys(outcome.group)[secret]


def wait_for_key(
    gateway: Gateway, outcomes: list[Outcome], check: Callable[[dict[str, Any]], bool]
) -> None:
    """Waits until every bad key's stored state passes `check` (key states are written
    behind, once a second), then asserts it."""
    for outcome in outcomes:

        def settled(outcome: Outcome = outcome) -> bool:
            return check(key_of(gateway, outcome, outcome.bad))

        assert eventually(settled), (outcome.name, key_of(gateway, outcome, outcome.bad))


def status_of(error: BaseException | None) -> int | None:
    if isinstance(error, openai.APIStatusError | anthropic.APIStatusError):
        return error.status_code
    if isinstance(error, genai_errors.APIError):
        return error.code
    return None


# -- faults met before the first byte: the client must not see them -------------------------

# What each fault does to the key that met it, as /api/keys shows it.
INVALID = {"status": "invalid"}
COOLING = {"status": "cooling"}
COUNTED = {"status": "active", "consecutive_failures": 1}

FAILOVER_FAULTS: dict[str, tuple[Behaviour, dict[str, Any], int, list[Client], dict[str, Any]]] = {
    # name: (the bad key's behaviour, its state after, the retry row's status, clients, config)
    "401": (Behaviour(status=401), INVALID, 401, EVERY_SDK, {}),
    "403": (Behaviour(status=403), INVALID, 403, OPENAI, {}),
    "408": (Behaviour(status=408), COUNTED, 408, OPENAI, {}),
    "429 Retry-After": (Behaviour(status=429, retry_after="30"), COOLING, 429, EACH_SDK, {}),
    "500": (Behaviour(status=500), COUNTED, 500, OPENAI, {}),
    "502": (Behaviour(status=502), COUNTED, 502, OPENAI, {}),
    "503": (Behaviour(status=503), COUNTED, 503, EACH_SDK, {}),
    "504": (Behaviour(status=504), COUNTED, 504, OPENAI, {}),
    "reset before the first byte": (Behaviour(reset=True), COUNTED, 502, EVERY_SDK, {}),
    "hangs before its headers": (Behaviour(first_byte_delay=30), COUNTED, 502, EVERY_SDK, HANG),
    "closes midway through a plain answer": (Behaviour(cut_body=True), COUNTED, 502, PLAIN, {}),
    "hangs midway through a plain answer": (Behaviour(body_delay=30), COUNTED, 502, PLAIN, HANG),
}


@pytest.mark.parametrize("fault", list(FAILOVER_FAULTS))
def test_a_fault_before_the_first_byte_fails_over_to_the_healthy_key(
    gateway: Gateway, tally: Tally, fault: str
) -> None:
    behaviour, state, status, clients, config = FAILOVER_FAULTS[fault]
    outcomes = run_clients(gateway, clients, behaviour, 2, **config)
    tally.requests += len(outcomes)
    tally.errors_with_healthy_key += sum(o.error is not None for o in outcomes)
    tally.rows_expected += 2 * len(outcomes)
    for outcome in outcomes:
        # The client: the whole answer, as if nothing had happened.
        assert outcome.error is None, (outcome.name, repr(outcome.error))
        assert outcome.text == full_text(), outcome.name
        used = [r.key for r in gateway.fake.requests if r.key in (outcome.bad, outcome.good)]
        assert used == [outcome.bad, outcome.good], outcome.name
        # The log: the failed attempt as a retry, then the success as the final row.
        tally.rows_lost += max(0, 2 - len(outcome.rows))
        retry, final = outcome.rows
        assert (retry["request_type"], retry["status_code"], retry["is_success"]) == (
            "retry", status, False), (outcome.name, retry)  # fmt: skip
        assert retry["error_message"], outcome.name
        assert outcome.bad not in retry["error_message"]  # masked, if quoted at all
        assert (final["request_type"], final["status_code"], final["is_success"]) == (
            "final", 200, True), (outcome.name, final)  # fmt: skip
        assert final["total_tokens"] == PROMPT_TOKENS + COMPLETION_TOKENS, outcome.name
    # The key that met the fault, and the healthy one untouched.
    wait_for_key(gateway, outcomes, lambda key: all(key[k] == v for k, v in state.items()))
    for outcome in outcomes:
        bad = key_of(gateway, outcome, outcome.bad)
        assert bad["last_error"], outcome.name
        if state is COOLING:
            assert bad["cooling_until"], outcome.name
        good = key_of(gateway, outcome, outcome.good)
        assert (good["status"], good["consecutive_failures"]) == ("active", 0), outcome.name


# -- the client's own mistakes: passed on at once, nobody's fault ----------------------------

MISTAKE_CLIENTS: list[Client] = [*OPENAI, ("anthropic", False), ("gemini", False)]
CLIENT_MISTAKES = {400: MISTAKE_CLIENTS, 404: MISTAKE_CLIENTS, 409: OPENAI, 413: OPENAI,
                   422: MISTAKE_CLIENTS}  # fmt: skip


@pytest.mark.parametrize("status", list(CLIENT_MISTAKES))
def test_the_clients_own_mistake_reaches_it_at_once_and_leaves_the_key_alone(
    gateway: Gateway, tally: Tally, status: int
) -> None:
    outcomes = run_clients(gateway, CLIENT_MISTAKES[status], Behaviour(status=status), 1)
    tally.requests += len(outcomes)
    tally.rows_expected += len(outcomes)
    for outcome in outcomes:
        assert outcome.text is None, outcome.name
        assert status_of(outcome.error) == status, (outcome.name, repr(outcome.error))
        used = [r.key for r in gateway.fake.requests if r.key in (outcome.bad, outcome.good)]
        assert used == [outcome.bad], outcome.name  # not tried again
        tally.rows_lost += max(0, 1 - len(outcome.rows))
        (row,) = outcome.rows
        assert (row["request_type"], row["status_code"], row["is_success"]) == (
            "final", status, False), (outcome.name, row)  # fmt: skip
    for outcome in outcomes:
        for secret in (outcome.bad, outcome.good):
            key = key_of(gateway, outcome, secret)
            assert (key["status"], key["consecutive_failures"], key["last_error"]) == (
                "active", 0, ""), (outcome.name, key)  # fmt: skip


# -- faults met after the answer began: a broken answer, never a complete one ----------------

CUT_FAULTS = {
    "drops the stream midway": Behaviour(drop_after=2, event_interval=0.05),
    "resets the stream midway": Behaviour(drop_after=2, event_interval=0.05, reset=True),
}


@pytest.mark.parametrize("fault", list(CUT_FAULTS))
def test_a_stream_cut_midway_reaches_the_client_broken_and_spares_the_key(
    gateway: Gateway, tally: Tally, fault: str
) -> None:
    outcomes = run_clients(gateway, STREAMED, CUT_FAULTS[fault], 1)
    tally.requests += len(outcomes)
    tally.cut_mid_answer += sum(o.error is not None for o in outcomes)
    tally.rows_expected += len(outcomes)
    for outcome in outcomes:
        assert outcome.text is None, outcome.name
        assert outcome.error is not None, outcome.name
        assert status_of(outcome.error) is None, outcome.name  # a broken body, not a status
        tally.rows_lost += max(0, 1 - len(outcome.rows))
        (row,) = outcome.rows
        assert (row["request_type"], row["status_code"], row["is_success"]) == (
            "final", 200, False), (outcome.name, row)  # fmt: skip
        assert row["error_message"].startswith("upstream broke off"), (outcome.name, row)
    for outcome in outcomes:  # nobody's fault: not counted against the key
        key = key_of(gateway, outcome, outcome.bad)
        assert (key["status"], key["consecutive_failures"]) == ("active", 0), outcome.name


def test_malformed_events_reach_the_client_as_the_upstream_sent_them(
    gateway: Gateway, tally: Tally
) -> None:
    """gptload relays what it cannot parse as it is: each SDK meets the same events as it
    would from the provider itself, and raises (or not) as it would there."""
    behaviour = Behaviour(malformed_sse=True, event_interval=0.3)
    outcomes = run_clients(gateway, STREAMED, behaviour, 1)
    tally.requests += len(outcomes)
    tally.rows_expected += len(outcomes)
    # Straight to the fake provider, the proxy key is the upstream key.
    gateway.fake.behave(PROXY_KEY, Behaviour(malformed_sse=True))
    for outcome in outcomes:
        try:
            expected: object = sdk_call(gateway.fake.url, outcome.client)
        except Exception as exc:  # the SDK's own verdict on these events
            expected = type(exc)
        seen = outcome.text if outcome.error is None else type(outcome.error)
        assert seen == expected, outcome.name
        tally.cut_mid_answer += outcome.error is not None
        tally.rows_lost += max(0, 1 - len(outcome.rows))
        (row,) = outcome.rows
        # An SDK that gave up left before the last event (499); one that read past the
        # unreadable events got the whole answer.
        assert (row["status_code"], row["is_success"]) == (
            (200, True) if outcome.error is None else (499, False)), (outcome.name, row)  # fmt: skip
        key = key_of(gateway, outcome, outcome.bad)
        assert (key["status"], key["consecutive_failures"]) == ("active", 0), outcome.name


def test_a_malformed_stream_is_relayed_byte_for_byte_and_its_usage_still_read(
    gateway: Gateway, tally: Tally
) -> None:
    secret = f"sk-malformed-{uuid.uuid4().hex[:12]}"
    group = gateway.group([secret])
    gateway.fake.behave(secret, Behaviour(malformed_sse=True, compress=False))
    body = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", gateway.proxy(group) + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {PROXY_KEY}"}, timeout=10) as answer:  # fmt: skip
        raw = answer.read()
    tally.requests += 1
    tally.rows_expected += 1
    assert raw.startswith(b"".join(MALFORMED_EVENTS))
    assert raw.endswith(b"data: [DONE]\n\n")
    rows = gateway.wait_logs(group, 1)
    tally.rows_lost += max(0, 1 - len(rows))
    (row,) = rows
    assert (row["status_code"], row["is_success"], row["error_message"]) == (200, True, "")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (PROMPT_TOKENS, COMPLETION_TOKENS)


# -- compressed answers ----------------------------------------------------------------------


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd", "deflate"])
def test_compressed_errors_fail_over_and_compressed_answers_arrive_whole(
    gateway: Gateway, tally: Tally, coding: str
) -> None:
    """The bad key's 500 and the good key's answer both come compressed, plain and
    streamed: the error is read through the coding, the answer reaches the client as it
    was sent, and its usage is read through the coding too."""
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda stream: compressed_call(gateway, coding, stream),
                                [False, True]))  # fmt: skip
    tally.requests += 2
    tally.rows_expected += 4
    for stream, (status, encoding, plain, rows) in zip([False, True], results, strict=True):
        tally.errors_with_healthy_key += status != 200
        tally.rows_lost += max(0, 2 - len(rows))
        assert (status, encoding) == (200, coding), stream
        if stream:
            events = [json.loads(line[6:]) for line in plain.split("\n")
                      if line.startswith("data: {")]  # fmt: skip
            text = "".join(c["choices"][0]["delta"].get("content") or ""
                           for c in events if c["choices"])  # fmt: skip
        else:
            text = json.loads(plain)["choices"][0]["message"]["content"]
        assert text == full_text(), stream
        retry, final = rows
        assert (retry["status_code"], retry["request_type"]) == (500, "retry")
        assert retry["error_message"] == (
            "The server had an error while processing your request. Sorry about that!")  # fmt: skip
        assert (final["status_code"], final["is_success"]) == (200, True)
        assert (final["prompt_tokens"], final["completion_tokens"]) == (
            PROMPT_TOKENS, COMPLETION_TOKENS)  # fmt: skip


def compressed_call(
    gateway: Gateway, coding: str, stream: bool
) -> tuple[int, str, str, list[dict[str, Any]]]:
    """A call through [a key answering 500, a good key], both compressing in `coding`:
    the status, the answer's coding, its decoded text, and the group's log rows."""
    tag = uuid.uuid4().hex[:12]
    bad, good = f"sk-bad-{tag}", f"sk-good-{tag}"
    group = gateway.group([bad, good])
    gateway.fake.behave(bad, Behaviour(status=500, codings=(coding,)))  # type: ignore[arg-type]
    gateway.fake.behave(good, Behaviour(codings=(coding,)))  # type: ignore[arg-type]
    body: dict[str, Any] = {"model": "m", "messages": [], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", gateway.proxy(group) + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {PROXY_KEY}",
                               "Accept-Encoding": coding}, timeout=10) as answer:  # fmt: skip
        raw = b"".join(answer.iter_raw())
    encoding = answer.headers.get("content-encoding", "")
    plain = decompress(raw, coding).decode() if encoding == coding else raw.decode()
    return answer.status_code, encoding, plain, gateway.wait_logs(group, 2)


# -- no healthy key left: the client sees the provider's last answer, key masked -------------


@pytest.mark.parametrize(
    "failover_codes", ["401-403,408,429,500-599", "500-599"], ids=["failed over", "passed on"]
)
def test_with_no_healthy_key_the_client_gets_the_last_answer_with_the_key_masked(
    gateway: Gateway, tally: Tally, failover_codes: str
) -> None:
    """The upstream's 401 quotes the key, compressed: whether it ends the failover or is
    passed on at once (401 not a failover status), the client reads the key masked."""
    secret = f"sk-only-key-{uuid.uuid4().hex}"
    group = gateway.group([secret], failover_status_codes=failover_codes)
    gateway.fake.behave(secret, Behaviour(status=401))  # compressed, quoting the whole key
    client = openai.OpenAI(base_url=gateway.proxy(group) + "/v1", api_key=PROXY_KEY,
                           max_retries=0)  # fmt: skip
    with pytest.raises(openai.AuthenticationError) as raised:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    tally.requests += 1
    tally.rows_expected += 1
    assert gateway.fake.requests[-1].encoding is not None  # the 401 came compressed
    assert secret not in str(raised.value)
    assert secret not in raised.value.response.text
    assert "Incorrect API key provided: sk-o" in str(raised.value)  # the masked form
    rows = gateway.wait_logs(group, 1)
    tally.rows_lost += max(0, 1 - len(rows))
    (row,) = rows
    assert (row["request_type"], row["status_code"]) == ("final", 401)
    assert secret not in row["error_message"]
    assert eventually(lambda: gateway.keys(group)[secret]["status"] == "invalid")
