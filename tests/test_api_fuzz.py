"""The management API under schemathesis: every operation of /api/openapi.json, fuzzed.

Each operation gets up to `MAX_EXAMPLES` generated requests (valid and deliberately
invalid ones, plus schemathesis' boundary and content-type probes), sent in-process
through Django's WSGI handler with the admin key, against a small world of groups, keys,
logs and a finished job, whose ids replace the generated ones in about half of the valid
requests. No answer may be a 5xx; each must have a documented status, content type and
shape (errors included: `{code, message}`); an invalid request must be refused.
Derandomized: the same requests on every run, so a failure reproduces.

Each operation is its own test, so what one does (deleting a group, clearing keys) is
rolled back before the next. Jobs go to an in-memory Celery broker that no worker reads:
they stay pending, which later requests of the same operation then meet (a 409).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from kombu import pools
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from access.models import AccessKey
from conftest import ADMIN_KEY
from gptload.celery import app as celery_app
from gptload.lib.providers.base import Usage
from keys.models import APIKey, Group, GroupSubGroup, JobKind, JobStatus, KeyJob, KeyStatus
from logs.models import RequestLog
from logs.writer import LogEntry, write_batch
from tests.fakeprovider import FakeProvider

pytestmark = pytest.mark.django_db
MAX_EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

schema = schemathesis.openapi.from_wsgi("/api/openapi.json", get_wsgi_application())
# Every request carries the admin key and the security headers are not generated: a
# generated bad key would be overridden by this one, turning an invalid request valid.
# Wrong keys are tests/test_api.py's business.
schema.config.update(headers={"Authorization": f"Bearer {ADMIN_KEY}"})
schema.config.generation.update(with_security_parameters=False)
# The ids of the world's rows by parameter name, for `flatmap_case`; set per test.
KNOWN_IDS: dict[str, list[int]] = {}


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    """The upstream of the world's groups, for key tests and validations."""
    with FakeProvider() as fake:
        yield fake


@pytest.fixture(scope="module")
def memory_broker() -> Iterator[None]:
    """Celery on an in-memory broker that no worker reads; emptied at the end, so that
    the worker of keys/tests/test_jobs.py never meets these jobs."""
    saved = {"broker_url": celery_app.conf.broker_url,
             "broker_transport_options": celery_app.conf.broker_transport_options}  # fmt: skip
    celery_app.conf.update(broker_url="memory://", broker_transport_options={})
    forget_connections()
    yield
    celery_app.control.purge()
    celery_app.conf.update(saved)
    forget_connections()


def forget_connections() -> None:
    """Closes and forgets the connection and producer pools made for the previous broker.

    kombu keeps pools in a registry by broker URL: one only closed there would be handed
    back, closed, to the next user of `memory://` (keys/tests/test_jobs.py).
    """
    pools.reset()
    app: Any = celery_app  # private attributes: Celery caches both on first use
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture
def world(provider, memory_broker, settings) -> Iterator[None]:
    """Three standard groups (keys in every state), an aggregate, logs, a finished job and
    two access keys (one limited to a group, with usage)."""
    settings.AUTH_KEY = ADMIN_KEY
    # As Django's test client does: the handler must not close the test's connection.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    upstream = [{"url": provider.url, "weight": 1}]
    openai, other, gemini = (
        Group.objects.create(name=name, channel_type=channel, test_model=model, upstreams=upstream)
        for name, channel, model in (
            ("fuzz-openai", "openai", "gpt-4o-mini"),
            ("fuzz-openai-2", "openai", "gpt-4o-mini"),
            ("fuzz-gemini", "gemini", "gemini-2.0-flash"),
        )
    )
    aggregate = Group.objects.create(
        name="fuzz-aggregate", channel_type="openai", group_type="aggregate"
    )
    GroupSubGroup.objects.create(group=aggregate, sub_group=openai, weight=10)
    keys = [APIKey.build(openai, f"sk-fuzz-{status}-0123456789", status=status)
            for status in KeyStatus.values]  # fmt: skip
    for key in keys:
        key.save()
    APIKey.build(gemini, "AIza-fuzz-0123456789abcdef").save()
    now = timezone.now()
    for minutes, code in ((1, 200), (5, 401), (90, 429)):
        RequestLog.objects.create(
            timestamp=now - timedelta(minutes=minutes), group_id=openai.pk,
            group_name=openai.name, key_value=keys[0].key_value, key_hash=keys[0].key_hash,
            model="gpt-4o-mini", is_success=code == 200, status_code=code,
        )  # fmt: skip
    job = KeyJob.objects.create(
        kind=JobKind.VALIDATE, group=other, status=JobStatus.SUCCEEDED, finished_at=now
    )
    access = [AccessKey(name="fuzz-client", daily_tokens=1000), AccessKey(name="fuzz-open")]
    for access_key in access:
        access_key.issue()
        access_key.save()
    access[0].groups.set([openai, aggregate])
    write_batch([LogEntry(now.timestamp(), openai.pk, openai.name, None, "", None, "", "",
                          "gpt-4o-mini", 200, "", True, 3, "", "/", "", False,
                          usage=Usage(5, 7), access_key_id=access[0].pk)])  # fmt: skip
    groups = [openai.pk, other.pk, gemini.pk, aggregate.pk]
    KNOWN_IDS.update(group_id=groups, sub_group_id=groups, id=groups, groupId=groups,
                     key_id=[key.pk for key in keys], job_id=[job.pk],
                     access_key_id=[key.pk for key in access])  # fmt: skip
    yield
    KNOWN_IDS.clear()
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


def id_slots(value: Any) -> Iterator[tuple[dict[str, Any], str]]:
    """Every `(mapping, name)` in a request part, nested ones too, that holds an id."""
    if isinstance(value, dict):
        for name, item in value.items():
            if name in KNOWN_IDS and isinstance(item, int) and not isinstance(item, bool):
                yield value, name
            else:
                yield from id_slots(item)
    elif isinstance(value, list):
        for item in value:
            yield from id_slots(item)


def flatmap_case(context: Any, case: schemathesis.Case) -> st.SearchStrategy[schemathesis.Case]:
    """A valid case as generated, or with ids of existing rows in place of its ids.

    Invalid cases are left alone: an id put into one could make it valid.
    """
    if case.meta is None or case.meta.generation.mode is not GenerationMode.POSITIVE:
        return st.just(case)
    parts = (case.path_parameters, case.query, case.body)
    slots = [slot for part in parts for slot in id_slots(part)]
    if not slots:
        return st.just(case)

    def use(ids: tuple[int, ...]) -> schemathesis.Case:
        for (mapping, name), known in zip(slots, ids, strict=True):
            mapping[name] = known
        return case

    known = st.tuples(*(st.sampled_from(KNOWN_IDS[name]) for _, name in slots))
    return st.one_of(st.just(case), known.map(use))


@schema.hooks.apply(flatmap_case)
@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_operation_answers_5xx_or_off_its_schema(
    case, world, django_capture_on_commit_callbacks
):
    # On-commit callbacks (queueing a job, moving the config version) run as they would
    # after a real request: the test's transaction never commits.
    with django_capture_on_commit_callbacks(execute=True):
        case.call_and_validate(checks=CHECKS)
