"""The proxy's metrics as `/metrics` shows them, after real calls through the gateway."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import add_observations
from proxy.tests.conftest import PROXY_KEY, proxy_url, wait_until
from tests.fakeprovider import Behaviour

pytestmark = pytest.mark.django_db(transaction=True)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def scrape(client: Any, key: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.content
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def value(figures: dict[Any, float], name: str, **labels: str) -> float:
    return figures.get((name, frozenset(labels.items())), 0.0)


def test_requests_retries_refusals_and_times_are_counted(gateway, make_group, provider, client):
    make_group(name="counted", keys=("bad", "good"))
    provider.behave("bad", Behaviour(status=500))
    before = scrape(client, PROXY_KEY)
    url = proxy_url(gateway, "counted") + "/v1/chat/completions"
    for _ in range(4):
        assert httpx.post(
            url, json=CHAT, headers={"Authorization": f"Bearer {PROXY_KEY}"}
        ).is_success
    assert httpx.post(url, json=CHAT, headers={"Authorization": "Bearer wrong"}).status_code == 401
    retried = provider.keys_used().count("bad")  # each one was followed by a try on "good"
    assert retried >= 1

    def counted() -> dict[Any, float]:
        return scrape(client, PROXY_KEY)

    ok = {"group": "counted", "provider": "openai", "status": "200", "outcome": "success"}
    assert wait_until(lambda: value(counted(), "gptload_requests_total", **ok) == 4)
    after = counted()
    assert value(after, "gptload_retries_total", group="counted") == retried
    refused = {"group": "", "provider": "", "status": "401", "outcome": "refused"}
    # At least this one: a refusal of an earlier test on the shared gateway may be handed
    # to the metrics (once a second) after `before` was read.
    assert value(after, "gptload_requests_total", **refused) - value(
        before, "gptload_requests_total", **refused
    ) >= 1  # fmt: skip
    timed = {"group": "counted", "stream": "false"}
    assert value(after, "gptload_request_duration_seconds_count", **timed) == 4
    assert value(after, "gptload_request_duration_seconds_sum", **timed) > 0
    assert value(after, "gptload_request_duration_seconds_bucket", le="+Inf", **timed) == 4
    own = "gptload_overhead_seconds_count"
    assert value(after, own) - value(before, own) >= 4
    assert value(after, "gptload_log_rows_written_total") >= 4 + retried
    assert value(after, "gptload_keys", group="counted", state="active") >= 1
    assert value(after, "gptload_snapshot_build_seconds_count", kind="whole") >= 1


def test_a_tally_lands_in_the_histogram_as_observations_would():
    """`add_observations` writes prometheus_client's private bucket values: checked
    against `observe()` so that a release that renames them fails here."""
    registry = CollectorRegistry()
    bounds = (0.1, 1.0, math.inf)
    observed = Histogram("observed", "", buckets=bounds, registry=registry)
    added = Histogram("added", "", buckets=bounds, registry=registry)
    for seconds in (0.05, 0.5, 0.7, 3.0):
        observed.observe(seconds)
    add_observations(added, [1, 2, 1, 4.25])

    def figures(histogram: Histogram) -> list[tuple[str, str, float]]:
        samples = next(iter(histogram.collect())).samples
        return [(s.name.rsplit("_", 1)[1], s.labels.get("le", ""), s.value) for s in samples
                if not s.name.endswith("_created")]  # fmt: skip

    assert figures(observed) == figures(added)
    assert len(figures(added)) == 5  # three buckets, the count and the sum
