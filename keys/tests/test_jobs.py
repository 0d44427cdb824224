"""Key jobs through the API and a real Celery worker (threads pool, in-memory broker).

The worker runs in threads of this process with database connections of its own, so
these tests commit (`transaction=True`) and wait for the worker to be idle after each.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker
from celery.worker import state as worker_state
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from gptload.celery import app as celery_app
from keys import jobs, services
from keys.models import APIKey, Group, JobKind, JobStatus, KeyJob, KeyStatus
from settings_app.models import ConfigVersion
from tests.fakeprovider import Behaviour, FakeProvider

pytestmark = pytest.mark.django_db(transaction=True)
GOOD = "sk-good-0123456789abcdef"
BAD = "sk-bad-0123456789abcdef"
ENCRYPTION = "an-encryption-key-for-tests-0123"


@pytest.fixture(scope="module")
def worker() -> Iterator[object]:
    """A Celery worker with two threads, on the in-memory broker, for this module."""
    saved = {"broker_url": celery_app.conf.broker_url,
             "broker_transport_options": celery_app.conf.broker_transport_options}  # fmt: skip
    celery_app.conf.update(broker_url="memory://", broker_transport_options={})
    forget_connections()
    with start_worker(celery_app, pool="threads", concurrency=2, perform_ping_check=False,
                      shutdown_timeout=30, loglevel="WARNING") as running:  # fmt: skip
        yield running
    celery_app.conf.update(saved)
    forget_connections()


def forget_connections() -> None:
    """Drops the app's connection and producer pools, made for the previous broker."""
    app: Any = celery_app  # private attributes: Celery caches both on first use
    if app._pool is not None:
        app._pool.force_close_all()
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture(autouse=True)
def idle_worker_after(worker) -> Iterator[None]:
    """Each test ends with the worker idle: no job may touch the next test's database."""
    yield
    deadline = time.monotonic() + 30
    while worker_state.active_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not worker_state.active_requests, "a job was still running after the test"


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fake:
        yield fake


@pytest.fixture
def fake(provider) -> FakeProvider:
    provider.reset()
    return provider


def make_group(name: str = "openai", upstream: str = "https://api.openai.com", **fields) -> Group:
    return Group.objects.create(name=name, channel_type="openai", test_model="m",
                                upstreams=[{"url": upstream, "weight": 1}], **fields)  # fmt: skip


def add_key(group: Group, secret: str, status: str = KeyStatus.ACTIVE) -> APIKey:
    key = APIKey.build(group, secret, status=status)
    key.save()
    return key


def wait_for(admin_api, group: Group, timeout: float = 30) -> dict:
    """The group's latest job once it finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = admin_api.data(admin_api.get(f"/tasks/status?group_id={group.pk}"))
        if not status["is_running"]:
            return status
        time.sleep(0.05)
    raise AssertionError(f"the job of {group.name} did not finish in {timeout} s: {status}")


def wait_until(condition, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


# Import and delete ----------------------------------------------------------------------------


def test_an_async_import_runs_on_the_worker_and_reports_its_result(admin_api):
    group = make_group()
    add_key(group, "sk-held-0123456789")
    before = ConfigVersion.current()
    text = "\n".join(f"sk-new-{n:04d}-0123456789" for n in range(1500)) + "\nsk-held-0123456789"
    started = admin_api.data(
        admin_api.post("/keys/add-async", {"group_id": group.pk, "keys_text": text})
    )
    assert (started["task_type"], started["is_running"], started["group_name"]) == (
        "KEY_IMPORT",
        True,
        "openai",
    )
    assert (started["status"], started["total"], started["finished_at"]) == ("pending", 1501, None)
    done = wait_for(admin_api, group)
    assert done["id"] == started["id"]
    assert done["status"] == "succeeded", done
    assert done["result"] == {"added_count": 1500, "ignored_count": 1, "total_in_group": 1501}
    assert (done["processed"], done["total"], done["error"]) == (1501, 1501, "")
    assert done["started_at"] <= done["finished_at"]
    assert done["duration_seconds"] >= 0
    assert APIKey.objects.filter(group=group, status="active").count() == 1501
    job = KeyJob.objects.get()
    assert (job.payload, job.running_group_id) == ("", None)  # the keys do not linger
    assert ConfigVersion.current() > before


def test_a_key_file_is_uploaded_as_multipart(admin_api):
    group = make_group()
    upload = SimpleUploadedFile(
        "keys.txt", b"\xef\xbb\xbfsk-a-0123456789\r\nsk-b-0123456789\r\n\r\n"
    )
    response = admin_api.client.post("/api/keys/add-async", {"group_id": str(group.pk), "file": upload},
                                     headers=admin_api.headers)  # fmt: skip
    assert admin_api.data(response)["task_type"] == "KEY_IMPORT"
    assert wait_for(admin_api, group)["result"]["added_count"] == 2
    assert {k.secret for k in APIKey.objects.all()} == {"sk-a-0123456789", "sk-b-0123456789"}


@pytest.mark.parametrize(
    ("form", "status", "code", "words"),
    [
        ({"group_id": "{g}"}, 400, "VALIDATION_FAILED", "file"),
        ({"group_id": "{g}", "file": b"\xff\xfe\x00bad"}, 400, "VALIDATION_FAILED", "UTF-8"),
        ({"group_id": "one", "file": b"sk-a"}, 400, "VALIDATION_FAILED", "group_id"),
        ({"group_id": "999999", "file": b"sk-a"}, 404, "NOT_FOUND", "group"),
        ({"group_id": "{g}", "file": b" \n "}, 400, "VALIDATION_FAILED", "No keys found"),
        ({"group_id": "{g}", "file": b"ok bad\x07key"}, 400, "VALIDATION_FAILED", "control"),
    ],
)
def test_bad_uploads_are_refused_and_start_no_job(admin_api, form, status, code, words):
    group = make_group()
    data = {"group_id": form["group_id"].replace("{g}", str(group.pk))}
    if "file" in form:
        data["file"] = SimpleUploadedFile("keys.txt", form["file"])
    response = admin_api.client.post("/api/keys/add-async", data, headers=admin_api.headers)
    assert words in admin_api.refused(response, status, code)
    assert not KeyJob.objects.exists()
    assert not APIKey.objects.exists()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ('{"group_id": 1, "keys_text": ', "INVALID_JSON"),
        ('{"keys_text": "sk-a"}', "VALIDATION_FAILED"),
        ('{"group_id": 1, "keys_text": "sk-a", "more": 1}', "VALIDATION_FAILED"),
    ],
)
def test_bad_json_for_an_async_import_is_refused(admin_api, body, code):
    response = admin_api.client.post("/api/keys/add-async", body, content_type="application/json",
                                     headers=admin_api.headers)  # fmt: skip
    admin_api.refused(response, 400, code)
    assert not KeyJob.objects.exists()


def test_an_async_delete_removes_the_listed_keys(admin_api):
    group = make_group()
    services.import_keys(group, [f"sk-{n:04d}-0123456789" for n in range(1200)])
    doomed = "\n".join(f"sk-{n:04d}-0123456789" for n in range(0, 1200, 2)) + "\nsk-unknown"
    started = admin_api.data(
        admin_api.post("/keys/delete-async", {"group_id": group.pk, "keys_text": doomed})
    )
    assert started["task_type"] == "KEY_DELETE"
    done = wait_for(admin_api, group)
    assert done["result"] == {"deleted_count": 600, "ignored_count": 1, "total_in_group": 600}
    assert {k.secret for k in APIKey.objects.all()} == {
        f"sk-{n:04d}-0123456789" for n in range(1, 1200, 2)
    }


# Validation ------------------------------------------------------------------------------------


def test_a_group_is_validated_by_the_worker(admin_api, fake):
    group = make_group(upstream=fake.url)
    good = add_key(group, GOOD, KeyStatus.INVALID)
    bad = add_key(group, BAD, KeyStatus.ACTIVE)
    off = add_key(group, "sk-off-0123456789abcdef", KeyStatus.DISABLED)
    fake.behave(BAD, Behaviour(status=401))
    started = admin_api.data(admin_api.post("/keys/validate-group", {"group_id": group.pk}))
    assert started["task_type"] == "KEY_VALIDATION"
    done = wait_for(admin_api, group)
    assert done["status"] == "succeeded", done
    assert done["result"] == {"total_keys": 2, "valid_keys": 1, "invalid_keys": 1}
    assert (done["processed"], done["total"]) == (2, 2)
    for key in (good, bad, off):
        key.refresh_from_db()
    assert (good.status, bad.status, off.status) == ("active", "invalid", "disabled")
    assert "401" in bad.last_error
    assert "sk-off-0123456789abcdef" not in fake.keys_used()


def test_validation_can_be_limited_to_one_status(admin_api, fake):
    group = make_group(upstream=fake.url)
    add_key(group, GOOD, KeyStatus.INVALID)
    add_key(group, BAD, KeyStatus.ACTIVE)
    admin_api.data(
        admin_api.post("/keys/validate-group", {"group_id": group.pk, "status": "invalid"})
    )
    assert wait_for(admin_api, group)["result"] == {
        "total_keys": 1,
        "valid_keys": 1,
        "invalid_keys": 0,
    }
    assert fake.keys_used() == [GOOD]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"group_id": 999999}, 404, "NOT_FOUND"),
        ({"group_id": "{g}", "status": "disabled"}, 400, "VALIDATION_FAILED"),
        ({"group_id": "{agg}"}, 400, "VALIDATION_FAILED"),
        ({"group_id": "{bare}"}, 400, "VALIDATION_FAILED"),
    ],
)
def test_validations_that_cannot_run_are_refused_at_once(admin_api, body, status, code):
    group = make_group()
    aggregate = Group.objects.create(name="agg", channel_type="openai", group_type="aggregate")
    bare = Group.objects.create(name="bare", channel_type="openai", test_model="m",
                                upstreams=[{"url": "https://x.example", "weight": 0}])  # fmt: skip
    ids = {"{g}": group.pk, "{agg}": aggregate.pk, "{bare}": bare.pk}
    body = {k: ids.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    admin_api.refused(admin_api.post("/keys/validate-group", body), status, code)
    assert not KeyJob.objects.exists()


# One job per group, progress, status ---------------------------------------------------------


def slow_group(name: str, fake: FakeProvider, keys: int, delay: float) -> Group:
    group = make_group(name, upstream=fake.url, config={"key_validation_concurrency": 1})
    for n in range(keys):
        add_key(group, f"sk-{name}-{n:02d}-0123456789", KeyStatus.INVALID)
    fake.behave_default(Behaviour(first_byte_delay=delay))
    return group


def test_one_job_per_group_and_groups_run_side_by_side(admin_api, fake):
    first, second = slow_group("first", fake, 4, 0.4), slow_group("second", fake, 4, 0.4)
    one = admin_api.data(admin_api.post("/keys/validate-group", {"group_id": first.pk}))
    refused = admin_api.post("/keys/add-async", {"group_id": first.pk, "keys_text": "sk-x"})
    assert "already running for this group" in admin_api.refused(refused, 409, "TASK_IN_PROGRESS")
    two = admin_api.data(admin_api.post("/keys/validate-group", {"group_id": second.pk}))
    wait_until(lambda: set(KeyJob.objects.filter(status="running").values_list("id", flat=True))
               == {one["id"], two["id"]})  # fmt: skip
    status = admin_api.data(admin_api.get("/tasks/status"))
    assert status["id"] == two["id"]  # the latest job
    assert {job["group_name"] for job in status["jobs"]} == {"first", "second"}
    assert all(job["is_running"] for job in status["jobs"])
    wait_for(admin_api, first), wait_for(admin_api, second)
    assert admin_api.data(admin_api.get("/tasks/status"))["jobs"] == []
    admin_api.data(admin_api.post("/keys/add-async", {"group_id": first.pk, "keys_text": "sk-x"}))
    assert wait_for(admin_api, first)["result"]["added_count"] == 1


def test_progress_is_reported_while_the_job_runs(admin_api, fake):
    group = slow_group("slow", fake, 6, 0.3)
    admin_api.data(admin_api.post("/keys/validate-group", {"group_id": group.pk}))
    seen = set()
    while (status := admin_api.data(admin_api.get(f"/tasks/status?group_id={group.pk}")))[
        "is_running"
    ]:
        if status["status"] == "running":
            seen.add((status["processed"], status["total"]))
        time.sleep(0.05)
    assert any(0 < processed < total == 6 for processed, total in seen), seen
    assert (status["processed"], status["total"]) == (6, 6)


def test_a_cancelled_job_stops_and_frees_its_group(admin_api, fake):
    group = slow_group("slow", fake, 8, 0.4)
    job = admin_api.data(admin_api.post("/keys/validate-group", {"group_id": group.pk}))
    wait_until(lambda: KeyJob.objects.filter(pk=job["id"], processed__gte=1).exists())
    cancelled = admin_api.data(admin_api.post(f"/tasks/{job['id']}/cancel"))
    assert (cancelled["status"], cancelled["is_running"], cancelled["error"]) == (
        "failed", False, "cancelled by the operator")  # fmt: skip
    wait_until(lambda: not worker_state.active_requests)
    assert len(fake.requests) < 8  # the worker stopped early
    assert KeyJob.objects.get().error == "cancelled by the operator"
    admin_api.refused(admin_api.post(f"/tasks/{job['id']}/cancel"), 409, "CONFLICT")
    admin_api.refused(admin_api.post("/tasks/999999/cancel"), 404, "NOT_FOUND")
    admin_api.data(admin_api.post("/keys/add-async", {"group_id": group.pk, "keys_text": "sk-x"}))
    assert wait_for(admin_api, group)["status"] == "succeeded"


def test_a_job_whose_worker_died_is_given_up_and_frees_its_group(admin_api):
    group = make_group()
    job = jobs.create(group, JobKind.IMPORT, keys=["sk-a"], running=True)  # nobody runs it
    refused = admin_api.post("/keys/add-async", {"group_id": group.pk, "keys_text": "sk-b"})
    admin_api.refused(refused, 409, "TASK_IN_PROGRESS")
    KeyJob.objects.filter(pk=job.pk).update(updated_at=timezone.now() - timedelta(minutes=3))
    status = admin_api.data(admin_api.get(f"/tasks/status?group_id={group.pk}"))
    assert (status["status"], status["is_running"]) == ("failed", False)
    assert "stopped reporting progress" in status["error"]
    admin_api.data(admin_api.post("/keys/add-async", {"group_id": group.pk, "keys_text": "sk-b"}))
    assert wait_for(admin_api, group)["status"] == "succeeded"


def test_a_job_no_worker_took_is_given_up_after_an_hour(admin_api):
    group = make_group()
    job = jobs.create(group, JobKind.IMPORT, keys=["sk-a"])  # pending, never queued
    KeyJob.objects.filter(pk=job.pk).update(updated_at=timezone.now() - timedelta(minutes=59))
    assert jobs.abandon_stale() == 0
    KeyJob.objects.filter(pk=job.pk).update(updated_at=timezone.now() - timedelta(minutes=61))
    assert jobs.abandon_stale() == 1
    job.refresh_from_db()
    assert (job.status, job.running_group_id) == ("failed", None)
    assert "Celery worker" in job.error
    jobs.run(job.pk)  # a worker that takes it late leaves it alone
    job.refresh_from_db()
    assert job.status == "failed"
    assert not APIKey.objects.exists()


def test_the_status_is_idle_without_jobs_and_refuses_an_unknown_group(admin_api):
    status = admin_api.data(admin_api.get("/tasks/status"))
    assert status == {"id": None, "task_type": "", "kind": "", "status": "", "is_running": False,
                      "group_id": None, "group_name": "", "processed": 0, "total": 0, "result": None,
                      "error": "", "created_at": None, "started_at": None, "finished_at": None,
                      "duration_seconds": 0.0, "waiting_for_worker": False, "note": "",
                      "jobs": []}  # fmt: skip
    admin_api.refused(admin_api.get("/tasks/status?group_id=999999"), 404, "NOT_FOUND")


def test_the_status_of_one_group_is_its_latest_job(admin_api):
    first, second = make_group("first"), make_group("second")
    admin_api.data(admin_api.post("/keys/add-async", {"group_id": first.pk, "keys_text": "sk-a"}))
    wait_for(admin_api, first)
    admin_api.data(
        admin_api.post("/keys/delete-async", {"group_id": second.pk, "keys_text": "sk-a"})
    )
    wait_for(admin_api, second)
    assert admin_api.data(admin_api.get("/tasks/status"))["task_type"] == "KEY_DELETE"
    mine = admin_api.data(admin_api.get(f"/tasks/status?group_id={first.pk}"))
    assert (mine["task_type"], mine["group_name"], mine["result"]["added_count"]) == (
        "KEY_IMPORT",
        "first",
        1,
    )


# Failures ------------------------------------------------------------------------------------


def test_a_job_that_fails_records_why(admin_api, fake):
    group = make_group(upstream=fake.url)
    add_key(group, GOOD, KeyStatus.INVALID)
    job = jobs.create(group, JobKind.VALIDATE)
    Group.objects.filter(pk=group.pk).update(upstreams=[{"url": fake.url, "weight": 0}])
    jobs.run(job.pk)
    job.refresh_from_db()
    assert (job.status, job.running_group_id) == ("failed", None)
    assert "no upstream with a weight above 0" in job.error


def test_an_unreachable_broker_is_a_503_and_the_job_is_recorded_failed(admin_api, monkeypatch):
    def refuse(*args, **kwargs):
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    monkeypatch.setattr(celery_app, "send_task", refuse)
    group = make_group()
    response = admin_api.post("/keys/add-async", {"group_id": group.pk, "keys_text": "sk-a"})
    assert "Celery broker" in admin_api.refused(response, 503, "SERVICE_UNAVAILABLE")
    job = KeyJob.objects.get()
    assert (job.status, job.running_group_id, job.payload) == ("failed", None, "")
    assert "could not be queued" in job.error


@override_settings(ENCRYPTION_KEY=ENCRYPTION)
def test_a_queued_key_list_is_stored_encrypted(admin_api):
    group = make_group()
    job = jobs.create(group, JobKind.IMPORT, keys=["sk-secret-0123456789"])
    assert "sk-secret" not in KeyJob.objects.get(pk=job.pk).payload
    with override_settings(ENCRYPTION_KEY="a-different-encryption-key-987"):
        jobs.run(job.pk)
    job.refresh_from_db()
    assert (job.status, job.payload) == ("failed", "")
    assert "another ENCRYPTION_KEY" in job.error
    assert not APIKey.objects.exists()


def test_a_too_big_key_list_is_refused_before_a_job_starts(admin_api, monkeypatch):
    monkeypatch.setattr(jobs, "payload_limit", lambda: 100)
    group = make_group()
    text = " ".join(f"sk-{n:03d}-0123456789" for n in range(20))
    # Imports are stored in parts (no such limit); a deletion's list is one row.
    response = admin_api.post("/keys/delete-async", {"group_id": group.pk, "keys_text": text})
    assert "manage.py import_keys" in admin_api.refused(response, 400, "VALIDATION_FAILED")
    assert not KeyJob.objects.exists()


def test_the_key_list_limit_is_the_databases_statement_size():
    limit = jobs.payload_limit()
    if connection.vendor == "mysql":
        assert limit is not None
        assert limit >= 2**20
    else:
        assert limit is None  # SQLite and PostgreSQL take what the upload limit lets in


def test_only_the_latest_finished_jobs_of_a_group_are_kept(admin_api):
    group = make_group()
    for _ in range(jobs.KEEP_FINISHED + 3):
        job = jobs.create(group, JobKind.DELETE, keys=["sk-a"], running=True)
        jobs.cancel(job)
    assert KeyJob.objects.filter(group=group).count() == jobs.KEEP_FINISHED + 1


def test_progress_is_stored_from_any_thread_at_most_every_half_second(admin_api):
    group = make_group()
    job = jobs.create(group, JobKind.IMPORT, keys=["k"] * 10, running=True)
    with jobs.Heartbeat(job.pk) as progress:
        for n in range(1000):
            progress(n, 1000)
        wait_until(lambda: KeyJob.objects.get(pk=job.pk).processed == 999, timeout=5)
        stored_at = KeyJob.objects.get(pk=job.pk).updated_at
        progress(1000, 1000)
        time.sleep(0.1)
        assert KeyJob.objects.get(pk=job.pk).updated_at == stored_at  # not yet: 0.5 s apart
        wait_until(lambda: KeyJob.objects.get(pk=job.pk).processed == 1000, timeout=5)
    assert JobStatus(KeyJob.objects.get(pk=job.pk).status) == JobStatus.RUNNING
