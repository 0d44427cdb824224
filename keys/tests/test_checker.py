from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from django.test import override_settings

from conftest import free_port
from keys import checker
from keys.models import APIKey, Group, KeyStatus
from settings_app.models import ConfigVersion
from tests.fakeprovider import Behaviour, FakeProvider
from tests.forwardproxy import ForwardProxy

pytestmark = pytest.mark.django_db
CHANNELS = ["openai", "openai-response", "anthropic", "gemini"]
# Where each provider's free check goes, and where the key travels.
MODEL_LIST = {
    "openai": ("/v1/models", "authorization"),
    "openai-response": ("/v1/models", "authorization"),
    "anthropic": ("/v1/models", "x-api-key"),
    "gemini": ("/v1beta/models", "query"),
}
GOOD = "sk-good-0123456789abcdef"
BAD = "sk-bad-0123456789abcdef"
BUSY = "sk-busy-0123456789abcdef"
BROKEN = "sk-broken-0123456789abcdef"


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fake:
        yield fake


@pytest.fixture
def fake(provider: FakeProvider) -> FakeProvider:
    provider.reset()
    return provider


def make_group(upstream: str, channel: str = "openai", **fields) -> Group:
    return Group.objects.create(
        name=f"g-{channel}-{Group.objects.count()}",
        channel_type=channel,
        test_model="fake-model",
        upstreams=[{"url": upstream, "weight": 1}],
        **fields,
    )


def add_key(group: Group, secret: str, status: str = KeyStatus.INVALID, **fields) -> APIKey:
    key = APIKey.build(group, secret, status=status, **fields)
    key.save()
    return key


def stored(key: APIKey) -> APIKey:
    return APIKey.objects.get(pk=key.pk)


# Each provider --------------------------------------------------------------------------


@pytest.mark.parametrize("channel", CHANNELS)
def test_each_provider_is_checked_for_free_with_its_model_list(fake, channel):
    group = make_group(fake.url, channel)
    good, bad = add_key(group, GOOD), add_key(group, BAD)
    fake.behave(BAD, Behaviour(status=401))

    result = checker.validate_keys(group)

    assert result == {"total_keys": 2, "valid_keys": 1, "invalid_keys": 1}
    path, source = MODEL_LIST[channel]
    assert sorted(fake.keys_used()) == sorted([GOOD, BAD])
    for request in fake.requests:
        assert (request.method, request.path, request.key_source) == ("GET", path, source)
    if channel == "anthropic":
        assert fake.requests[0].headers["anthropic-version"] == "2023-06-01"
    good, bad = stored(good), stored(bad)
    assert (good.status, good.consecutive_failures, good.last_error) == ("active", 0, "")
    assert good.status_changed_at is not None
    assert bad.status == "invalid"
    assert bad.last_error.startswith("[status 401] ")


@pytest.mark.parametrize("channel", CHANNELS)
def test_a_rejected_key_is_benched_even_when_it_was_active(fake, channel):
    group = make_group(fake.url, channel)
    refused = add_key(group, BAD, status=KeyStatus.ACTIVE)
    gemini_style = add_key(group, BROKEN, status=KeyStatus.ACTIVE, consecutive_failures=2)
    fake.behave(BAD, Behaviour(status=403))
    fake.behave(BROKEN, Behaviour(invalid_key_message=True))

    result = checker.validate_keys(group, statuses=["active"])

    assert result == {"total_keys": 2, "valid_keys": 0, "invalid_keys": 2}
    assert stored(refused).status == "invalid"
    assert stored(refused).last_error.startswith("[status 403] ")
    assert stored(gemini_style).status == "invalid"
    assert (
        stored(gemini_style).last_error
        == "[status 400] API key not valid. Please pass a valid API key."
    )


@pytest.mark.parametrize("channel", CHANNELS)
def test_a_rate_limited_key_counts_valid_and_only_an_invalid_one_changes(fake, channel):
    group = make_group(fake.url, channel)
    was_invalid = add_key(group, BUSY)
    was_active = add_key(group, GOOD, status=KeyStatus.ACTIVE, consecutive_failures=1)
    fake.behave(BUSY, Behaviour(status=429, retry_after="30"))
    fake.behave(GOOD, Behaviour(status=429))

    result = checker.validate_keys(group, statuses=["invalid", "active"])

    assert result == {"total_keys": 2, "valid_keys": 2, "invalid_keys": 0}
    assert (stored(was_invalid).status, stored(was_invalid).last_error) == ("active", "")
    untouched = stored(was_active)
    assert (untouched.status, untouched.consecutive_failures) == ("active", 1)
    assert untouched.status_changed_at is None


@pytest.mark.parametrize("channel", CHANNELS)
def test_a_server_error_is_recorded_but_changes_no_status(fake, channel):
    group = make_group(fake.url, channel)
    active = add_key(group, GOOD, status=KeyStatus.ACTIVE)
    invalid = add_key(group, BAD)
    fake.behave(GOOD, Behaviour(status=500))
    fake.behave(BAD, Behaviour(status=503))

    result = checker.validate_keys(group, statuses=["active", "invalid"])

    assert result == {"total_keys": 2, "valid_keys": 0, "invalid_keys": 2}
    assert stored(active).status == "active"
    assert stored(active).last_error.startswith("[status 500] ")
    assert stored(invalid).status == "invalid"
    assert stored(invalid).last_error.startswith("[status 503] ")


@pytest.mark.parametrize("channel", CHANNELS)
def test_a_slow_upstream_times_out_after_the_validation_timeout(fake, channel):
    group = make_group(fake.url, channel, config={"key_validation_timeout_seconds": 1})
    active = add_key(group, GOOD, status=KeyStatus.ACTIVE)
    invalid = add_key(group, BAD)
    fake.behave_default(Behaviour(first_byte_delay=3))

    started = time.monotonic()
    result = checker.validate_keys(group, statuses=["active", "invalid"])

    assert time.monotonic() - started < 2.5
    assert result == {"total_keys": 2, "valid_keys": 0, "invalid_keys": 2}
    assert (stored(active).status, stored(active).last_error) == ("active", "no answer within 1 s")
    assert (stored(invalid).status, stored(invalid).last_error) == (
        "invalid",
        "no answer within 1 s",
    )


def test_an_unreachable_upstream_is_a_failure_not_a_verdict_on_the_key():
    group = make_group(f"http://127.0.0.1:{free_port()}")
    active = add_key(group, GOOD, status=KeyStatus.ACTIVE)

    result = checker.validate_keys(group, statuses=["active"])

    assert result == {"total_keys": 1, "valid_keys": 0, "invalid_keys": 1}
    assert stored(active).status == "active"
    assert stored(active).last_error.startswith("request failed: ")


def test_the_key_is_masked_in_every_recorded_error(fake):
    group = make_group(fake.url)
    echoed = {"error": {"message": f"key {BAD} is revoked", "type": "invalid_request_error"}}
    fake.behave(BAD, Behaviour(status=401, body=json.dumps(echoed).encode()))
    fake.behave(BROKEN, Behaviour(status=502, body=f"bad gateway for {BROKEN}".encode()))
    add_key(group, BAD)
    add_key(group, BROKEN)

    checker.validate_keys(group)

    errors = sorted(APIKey.objects.values_list("last_error", flat=True))
    assert errors == [
        "[status 401] key sk-b…cdef is revoked",
        "[status 502] bad gateway for sk-b…cdef",
    ]


# Concurrency, progress, bookkeeping -----------------------------------------------------


def test_no_more_keys_are_checked_at_once_than_the_concurrency(fake):
    group = make_group(fake.url, config={"key_validation_concurrency": 2})
    for n in range(4):
        add_key(group, f"sk-slow-{n}-0123456789")
    fake.behave_default(Behaviour(first_byte_delay=0.5))

    started = time.monotonic()
    result = checker.validate_keys(group)
    elapsed = time.monotonic() - started

    assert result["valid_keys"] == 4
    starts = sorted(r.started for r in fake.requests)
    assert starts[1] - starts[0] < 0.3  # two at once...
    assert starts[2] - starts[0] >= 0.45  # ...and the third waits for a free slot
    assert 0.95 <= elapsed < 1.9


def test_keys_are_checked_in_parallel_up_to_the_concurrency(fake):
    group = make_group(fake.url, config={"key_validation_concurrency": 10})
    for n in range(10):
        add_key(group, f"sk-slow-{n}-0123456789")
    fake.behave_default(Behaviour(first_byte_delay=0.5))

    started = time.monotonic()
    assert checker.validate_keys(group)["valid_keys"] == 10
    assert time.monotonic() - started < 1.5


def test_progress_is_reported_from_zero_to_the_total(fake):
    group = make_group(fake.url)
    for n in range(3):
        add_key(group, f"sk-key-{n}-0123456789")
    calls: list[tuple[int, int]] = []

    checker.validate_keys(group, progress=lambda done, total: calls.append((done, total)))

    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_the_configuration_version_moves_once_per_run(fake, django_capture_on_commit_callbacks):
    group = make_group(fake.url)
    for n in range(3):
        add_key(group, f"sk-key-{n}-0123456789")
    before = ConfigVersion.current()

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        checker.validate_keys(group)

    assert len(callbacks) == 1
    assert ConfigVersion.current() == before + 1


def test_a_group_without_keys_to_check_sends_nothing(fake, django_capture_on_commit_callbacks):
    group = make_group(fake.url)
    add_key(group, GOOD, status=KeyStatus.ACTIVE)
    calls: list[tuple[int, int]] = []

    with django_capture_on_commit_callbacks() as callbacks:
        result = checker.validate_keys(group, progress=lambda *a: calls.append(a))

    assert result == {"total_keys": 0, "valid_keys": 0, "invalid_keys": 0}
    assert (fake.requests, callbacks, calls) == ([], [], [(0, 0)])
    assert Group.objects.get(pk=group.pk).last_validated_at is not None


def test_key_ids_choose_exactly_those_keys_of_the_group(fake):
    group = make_group(fake.url)
    other = make_group(fake.url)
    chosen = add_key(group, GOOD, status=KeyStatus.ACTIVE)
    add_key(group, BAD)
    foreign = add_key(other, BROKEN)

    result = checker.validate_keys(group, key_ids=[chosen.pk, foreign.pk, chosen.pk])

    assert result == {"total_keys": 1, "valid_keys": 1, "invalid_keys": 0}
    assert fake.keys_used() == [GOOD]
    assert Group.objects.get(pk=group.pk).last_validated_at is None


def test_an_unknown_status_is_refused(fake):
    group = make_group(fake.url)
    with pytest.raises(checker.CheckError, match="unknown key status 'all'"):
        checker.validate_keys(group, statuses=["all"])


def test_a_disabled_key_is_never_re_enabled(fake):
    group = make_group(fake.url)
    disabled = add_key(group, GOOD, status=KeyStatus.DISABLED, last_error="old")

    assert checker.validate_keys(group, statuses=["disabled"])["valid_keys"] == 1
    assert (stored(disabled).status, stored(disabled).last_error) == ("disabled", "")


def test_a_key_that_does_not_decrypt_is_not_sent(fake):
    group = make_group(fake.url)
    unreadable = add_key(group, BAD)  # stored in plaintext, read under an ENCRYPTION_KEY
    with override_settings(ENCRYPTION_KEY="an-encryption-key-0123456789"):
        add_key(group, GOOD)
        result = checker.validate_keys(group)

    assert result == {"total_keys": 2, "valid_keys": 1, "invalid_keys": 1}
    assert fake.keys_used() == [GOOD]
    assert stored(unreadable).status == "invalid"
    assert "cannot decrypt" in stored(unreadable).last_error


def test_an_aggregate_group_has_no_keys_to_validate_or_test(fake):
    member = make_group(fake.url)
    aggregate = Group.objects.create(
        name="agg", channel_type="openai", group_type="aggregate", test_model="-"
    )
    aggregate.members.create(sub_group=member, weight=1)

    assert checker.validate_keys(aggregate)["total_keys"] == 0
    with pytest.raises(checker.CheckError, match="no upstream"):
        checker.test_keys(aggregate, [GOOD])


# Request shape ------------------------------------------------------------------------


GENERATION = {
    "openai": ("/v1/chat/completions", "authorization"),
    "openai-response": ("/v1/responses", "authorization"),
    "anthropic": ("/v1/messages", "x-api-key"),
    "gemini": ("/v1beta/models/fake-model:generateContent", "query"),
}


@pytest.mark.parametrize("channel", CHANNELS)
def test_the_generation_check_is_gpt_loads_request(fake, channel, monkeypatch):
    monkeypatch.setattr(checker, "CHECK_WITH_GENERATION", True)
    group = make_group(fake.url, channel)
    add_key(group, GOOD)

    assert checker.validate_keys(group)["valid_keys"] == 1

    (request,) = fake.requests
    assert (request.method, request.path, request.key_source) == ("POST", *GENERATION[channel])
    body = request.json
    if channel == "gemini":
        assert body == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    elif channel == "openai-response":
        assert body == {"model": "fake-model", "input": "hi"}
    elif channel == "anthropic":
        assert body["max_tokens"] == 1
        assert body["model"] == "fake-model"
    else:
        assert body == {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def test_a_validation_endpoint_switches_to_a_generation_call_there(fake):
    group = make_group(fake.url, validation_endpoint="/v1/chat/completions?probe=1")
    add_key(group, GOOD)

    checker.validate_keys(group)

    (request,) = fake.requests
    assert (request.method, request.path, request.query) == (
        "POST",
        "/v1/chat/completions",
        {"probe": "1"},
    )
    assert request.json["model"] == "fake-model"


def test_gemini_ignores_the_validation_endpoint_as_gpt_load_does(fake):
    group = make_group(fake.url, "gemini", validation_endpoint="/v1/whatever")
    add_key(group, GOOD)

    checker.validate_keys(group)

    assert [(r.method, r.path) for r in fake.requests] == [("GET", "/v1beta/models")]


def test_header_rules_apply_to_checks(fake):
    rules = [
        {"key": "X-Key-Copy", "value": "${API_KEY}@${CLIENT_IP}", "action": "set"},
        {"key": "User-Agent", "value": "", "action": "remove"},
    ]
    group = make_group(fake.url, header_rules=rules)
    add_key(group, GOOD)

    checker.validate_keys(group)

    headers = fake.requests[0].headers
    assert headers["x-key-copy"] == f"{GOOD}@127.0.0.1"


def test_the_check_goes_through_the_groups_first_weighted_upstream(fake):
    group = make_group(fake.url)
    group.upstreams = [
        {"url": f"http://127.0.0.1:{free_port()}", "weight": 0},
        {"url": fake.url + "/", "weight": 2},
    ]
    group.save()
    add_key(group, GOOD)

    assert checker.validate_keys(group)["valid_keys"] == 1


@pytest.mark.parametrize("scheme", ["http", "socks5"])
def test_the_check_goes_through_the_groups_outbound_proxy(fake, scheme):
    with ForwardProxy() as proxy:
        url = proxy.http_url if scheme == "http" else proxy.socks_url
        group = make_group(fake.url, config={"proxy_url": url})
        add_key(group, GOOD)

        assert checker.validate_keys(group)["valid_keys"] == 1

        assert [hit[1] for hit in proxy.hits] == [f"127.0.0.1:{fake.port}"]


# test_keys ----------------------------------------------------------------------------


def test_testing_keys_reports_each_one_masked_and_stores_nothing(fake):
    group = make_group(fake.url)
    stored_key = add_key(group, BAD, status=KeyStatus.ACTIVE)
    fake.behave(BAD, Behaviour(status=401))
    fake.behave(BUSY, Behaviour(status=429))
    version = ConfigVersion.current()

    results = checker.test_keys(group, [GOOD, BAD, BUSY, GOOD])

    assert [r["key_value"] for r in results] == ["sk-g…cdef", "sk-b…cdef", "sk-b…cdef", "sk-g…cdef"]
    assert [r["is_valid"] for r in results] == [True, False, True, True]
    assert results[0]["error"] == ""
    assert results[1]["error"].startswith("[status 401] ")
    assert results[2]["error"].startswith("rate limited, but the key authenticates: [status 429]")
    assert all(isinstance(r["duration_ms"], int) and r["duration_ms"] >= 0 for r in results)
    assert sorted(fake.keys_used()) == sorted([GOOD, BAD, BUSY])  # each secret checked once
    assert stored(stored_key).status == "active"
    assert stored(stored_key).last_error == ""
    assert ConfigVersion.current() == version


def test_testing_no_keys_sends_nothing(fake):
    assert checker.test_keys(make_group(fake.url), []) == []
    assert fake.requests == []


def test_a_run_stopped_by_its_progress_callback_keeps_what_it_learnt(
    fake, django_capture_on_commit_callbacks
):
    group = make_group(fake.url)
    for n in range(5):
        add_key(group, f"sk-key-{n}-0123456789")

    def progress(done: int, total: int) -> None:
        if done == 2:
            raise RuntimeError("cancelled by the operator")

    with django_capture_on_commit_callbacks() as callbacks, pytest.raises(RuntimeError):
        checker.validate_keys(group, progress=progress)

    assert APIKey.objects.filter(status="active").count() == 2
    assert len(callbacks) == 1
