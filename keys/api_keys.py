"""`/api/keys/…` (GPT-Load's key endpoints, REFERENCE.md §5.2) and `/api/tasks/…`.

Keys appear in plaintext only in the list and the export (the admin's own view, as in
GPT-Load); everywhere else they are masked. Bulk changes of many keys run as jobs
(`keys.jobs`) whose status `/api/tasks/status` reports.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Literal

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db import transaction
from django.http import HttpRequest, StreamingHttpResponse
from django.utils import timezone
from django.utils.translation import gettext as _
from ninja import Field, Query, Router, Schema
from ninja.errors import ValidationError
from pydantic import ConfigDict
from pydantic import ValidationError as PydanticValidationError

from gptload.lib.api import (
    ERROR_RESPONSE,
    ApiError,
    Envelope,
    Page,
    PageQuery,
    not_found,
    ok,
    paginate,
)
from gptload.lib.crypto import DecryptionError, current_cipher
from gptload.lib.paging import Keyset
from keys import checker, jobs, services
from keys.models import APIKey, Group, JobKind, KeyJob, KeyStatus

router = Router(tags=["keys"])
tasks_router = Router(tags=["tasks"])
TEST_LIMIT = 500  # keys per synchronous test call
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
UNDECRYPTABLE = "failed-to-decrypt"  # GPT-Load's marker
KEY_ORDER = Keyset("last_used_at")  # GPT-Load's order, served by the apikey_group_last_used index
StatusName = Literal["active", "cooling", "invalid", "disabled"]
ExportStatus = Literal["all", "active", "cooling", "invalid", "disabled"]
NOT_QUEUED: dict[str, Any] = {"responses": {503: {
    **ERROR_RESPONSE, "description": "SERVICE_UNAVAILABLE: the job could not be queued "
    "(the Celery broker is unreachable); it is recorded as failed.",
}}}  # fmt: skip


# Strict: `"group_id": true` or `"5"` is a mistake to point out, not a value to convert.
STRICT = ConfigDict(extra="forbid", strict=True)


class GroupIn(Schema):
    model_config = STRICT
    group_id: int


class KeysTextIn(GroupIn):
    keys_text: str


class ValidateIn(GroupIn):
    status: Literal["all", "active", "cooling", "invalid"] | None = None


class NotesIn(Schema):
    model_config = STRICT
    notes: str = Field(max_length=255)


class StatusIn(Schema):
    model_config = STRICT
    status: Literal["active", "disabled"]


class KeyOut(Schema):
    id: int
    group_id: int
    key_value: str
    status: str
    notes: str
    request_count: int
    failure_count: int
    consecutive_failures: int
    cooling_until: datetime | None
    last_error: str
    last_used_at: datetime | None
    status_changed_at: datetime | None
    created_at: datetime
    updated_at: datetime


class KeyDetailOut(Schema):
    id: int
    group_id: int
    group_name: str
    masked_key: str
    status: str
    last_error: str
    cooling_until: datetime | None
    consecutive_failures: int
    failure_count: int
    request_count: int
    notes: str
    last_used_at: datetime | None
    status_changed_at: datetime | None
    created_at: datetime
    updated_at: datetime


class ImportOut(Schema):
    added_count: int
    ignored_count: int
    total_in_group: int


class DeleteOut(Schema):
    deleted_count: int
    ignored_count: int
    total_in_group: int


class RestoreOut(Schema):
    restored_count: int
    ignored_count: int
    total_in_group: int


class RestoredOut(Schema):
    message: str
    restored_count: int


class ClearedOut(Schema):
    message: str
    deleted_count: int


class TestResult(Schema):
    key_value: str = Field(description="masked")
    is_valid: bool
    error: str
    duration_ms: int


class TestOut(Schema):
    results: list[TestResult]
    total_duration: int = Field(description="milliseconds")


class TaskStatusOut(Schema):
    id: int | None
    task_type: str = Field(description="KEY_IMPORT, KEY_DELETE, KEY_VALIDATION or empty")
    kind: str
    status: str = Field(description="pending, running, succeeded, failed or empty")
    is_running: bool
    group_id: int | None
    group_name: str
    processed: int
    total: int
    result: dict[str, Any] | None
    error: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float
    waiting_for_worker: bool = Field(
        description="pending while no Celery worker has been seen lately: it will not start "
        "until one runs (gptload's own)"
    )
    note: str = Field(description="what to do about it, in the caller's language")


class TasksStatusOut(TaskStatusOut):
    jobs: list[TaskStatusOut] = Field(description="the unfinished jobs, newest first")


class KeyFilters(Schema):
    group_id: int
    status: StatusName | None = None
    key_value: str | None = Field(None, description="exact key (matched by hash)")


@router.get("", response=Envelope[Page[KeyOut]])
def list_keys(
    request: HttpRequest, filters: Query[KeyFilters], pages: Query[PageQuery]
) -> dict[str, Any]:
    """A group's keys, most recently used first (never used last, newest first), in
    plaintext for the admin (`failed-to-decrypt` when ENCRYPTION_KEY does not open one).

    Page by `page`, or follow `next_cursor` (as quick at any depth). A key used meanwhile
    moves to the front, so a walk may miss a key used during it; `/api/keys/export`
    lists every key once."""
    group = _group(filters.group_id)
    rows = APIKey.objects.filter(group=group)
    if filters.status:
        rows = rows.filter(status=filters.status)
    if filters.key_value:
        rows = rows.filter(key_hash=current_cipher().hash(filters.key_value.strip()))
    return ok(paginate(rows, pages, KEY_ORDER, _plaintext_rows))


def _plaintext_rows(rows: Iterable[APIKey]) -> list[dict[str, Any]]:
    cipher = current_cipher()
    out = []
    for key in rows:
        try:
            plaintext = cipher.decrypt(key.key_value)
        except DecryptionError:
            plaintext = UNDECRYPTABLE
        out.append({**_fields(key, KeyOut), "key_value": plaintext})
    return out


@router.get(
    "/export",
    response={200: None},
    openapi_extra={"responses": {200: {"description": "one key per line",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}},
)  # fmt: skip
def export_keys(
    request: HttpRequest, group_id: int, status: ExportStatus = "all"
) -> StreamingHttpResponse:
    """A group's keys in plaintext, one per line, streamed as `keys-{group}-{status}.txt`."""
    group = _group(group_id)
    lines: Iterator[str] | AsyncIterator[str]
    if isinstance(request, ASGIRequest):
        lines = _export_async(group.pk, status)
    else:
        lines = (batch.text for batch in services.export_keys(group.pk, status))
    response = StreamingHttpResponse(lines, content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="keys-{group.name}-{status}.txt"'
    response["Cache-Control"] = "no-store"
    return response


async def _export_async(group_id: int, status: str) -> AsyncIterator[str]:
    # Under ASGI a sync iterator would be drained into memory before the first byte.
    after: int | None = 0
    while after is not None:
        batch = await sync_to_async(services.export_batch)(group_id, status, after)
        if batch.text:
            yield batch.text
        after = batch.last_id


@router.post("/add-multiple", response=Envelope[ImportOut])
def add_multiple(request: HttpRequest, payload: KeysTextIn) -> dict[str, Any]:
    """Adds up to 5,000 keys at once; keys the group already holds are ignored."""
    group = _group(payload.group_id)
    with _refusals():
        keys = services.parse_keys(payload.keys_text)
        services.check_sync_limit(keys, _("use /api/keys/add-async for more."))
        with transaction.atomic():  # all or nothing
            return ok(services.import_keys(group, keys))


@router.post(
    "/add-async",
    response=Envelope[TaskStatusOut],
    openapi_extra={**NOT_QUEUED, "requestBody": {"content": {
        "application/json": {"schema": {"type": "object", "required": ["group_id", "keys_text"],
                             "properties": {"group_id": {"type": "integer"},
                                            "keys_text": {"type": "string"}},
                             "additionalProperties": False}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["group_id", "file"],
                                "properties": {"group_id": {"type": "integer"},
                                               "file": {"type": "string", "format": "binary"}}}},
    }}},
)  # fmt: skip
def add_async(request: HttpRequest) -> dict[str, Any]:
    """Imports any number of keys as a background job: JSON `{group_id, keys_text}`,
    or a text file as multipart `file` + `group_id`. Returns the job's status."""
    group_id, texts = _async_input(request)
    group = _group(group_id)
    with _refusals():
        # Read as a stream: a file a chunk at a time, stored in parts as it is read.
        return ok(jobs.describe(jobs.start_import(group, texts)))


@router.post("/delete-multiple", response=Envelope[DeleteOut])
def delete_multiple(request: HttpRequest, payload: KeysTextIn) -> dict[str, Any]:
    """Deletes up to 5,000 listed keys from the group."""
    group = _group(payload.group_id)
    with _refusals():
        keys = services.parse_keys(payload.keys_text)
        services.check_sync_limit(keys, _("use /api/keys/delete-async for more."))
        with transaction.atomic():
            return ok(services.delete_keys(group, keys))


@router.post("/delete-async", response=Envelope[TaskStatusOut], openapi_extra=NOT_QUEUED)
def delete_async(request: HttpRequest, payload: KeysTextIn) -> dict[str, Any]:
    """Deletes any number of listed keys from the group as a background job."""
    group = _group(payload.group_id)
    with _refusals():
        keys = services.parse_keys(payload.keys_text)
        return ok(jobs.describe(jobs.start(group, JobKind.DELETE, keys=keys)))


@router.post("/restore-multiple", response=Envelope[RestoreOut])
def restore_multiple(request: HttpRequest, payload: KeysTextIn) -> dict[str, Any]:
    """Makes the listed invalid keys active again (failure streak reset)."""
    group = _group(payload.group_id)
    with _refusals():
        keys = services.parse_keys(payload.keys_text)
        services.check_sync_limit(keys, _("send them in several calls or use restore-all-invalid."))
        with transaction.atomic():
            return ok(services.restore_keys(group, keys))


@router.post("/restore-all-invalid", response=Envelope[RestoredOut])
def restore_all_invalid(request: HttpRequest, payload: GroupIn) -> dict[str, Any]:
    """Makes every invalid key of the group active again."""
    group = _group(payload.group_id)
    restored = services.restore_all_invalid(group)
    message = _("%(count)d keys restored") % {"count": restored}
    return ok({"message": message, "restored_count": restored})


@router.post("/clear-all-invalid", response=Envelope[ClearedOut])
def clear_all_invalid(request: HttpRequest, payload: GroupIn) -> dict[str, Any]:
    """Deletes every invalid key of the group."""
    group = _group(payload.group_id)
    deleted = services.clear_keys(group, KeyStatus.INVALID)
    message = _("%(count)d invalid keys cleared") % {"count": deleted}
    return ok({"message": message, "deleted_count": deleted})


@router.post("/clear-all", response=Envelope[ClearedOut])
def clear_all(request: HttpRequest, payload: GroupIn) -> dict[str, Any]:
    """Deletes every key of the group."""
    group = _group(payload.group_id)
    deleted = services.clear_keys(group, "all")
    message = _("%(count)d keys cleared") % {"count": deleted}
    return ok({"message": message, "deleted_count": deleted})


@router.post("/validate-group", response=Envelope[TaskStatusOut], openapi_extra=NOT_QUEUED)
def validate_group(request: HttpRequest, payload: ValidateIn) -> dict[str, Any]:
    """Checks the group's keys against its upstream as a background job: `status`
    active, cooling or invalid, or all of them (never operator-disabled keys)."""
    group = _group(payload.group_id)
    statuses: list[str] = list(jobs.VALIDATABLE)
    if payload.status is not None and payload.status != "all":
        statuses = [payload.status]
    with _refusals():
        services.ensure_holds_keys(group)
        checker.probe_for(group)  # a group with no upstream is refused now, not in the job
        job = jobs.start(group, JobKind.VALIDATE, params={"statuses": statuses})
    return ok(jobs.describe(job))


@router.post("/test-multiple", response=Envelope[TestOut])
def test_multiple(request: HttpRequest, payload: KeysTextIn) -> dict[str, Any]:
    """Tests up to 500 keys against the group's upstream now, storing nothing."""
    group = _group(payload.group_id)
    with _refusals():
        services.ensure_holds_keys(group)
        checker.probe_for(group)
        keys = list(dict.fromkeys(services.parse_keys(payload.keys_text)))
        if len(keys) > TEST_LIMIT:
            raise services.KeyTextError(
                _(
                    "Test at most %(limit)d keys at once (%(count)d sent); import them "
                    "and use /api/keys/validate-group for more."
                )
                % {"limit": TEST_LIMIT, "count": len(keys)}
            )
        started = time.monotonic()
        results = checker.test_keys(group, keys)
    return ok({"results": results, "total_duration": round((time.monotonic() - started) * 1000)})


@router.get("/{int:key_id}", response=Envelope[KeyDetailOut])
def get_key(request: HttpRequest, key_id: int) -> dict[str, Any]:
    """One key's state: status and why (last_error), cooling, counters (key masked)."""
    return ok(_detail(_key(key_id)))


@router.put("/{int:key_id}/notes", response=Envelope[KeyDetailOut])
def set_notes(request: HttpRequest, key_id: int, payload: NotesIn) -> dict[str, Any]:
    """Sets the key's notes (at most 255 characters)."""
    # update(): notes do not concern the proxy, so no configuration reload.
    if not APIKey.objects.filter(pk=key_id).update(
        notes=payload.notes.strip(), updated_at=timezone.now()
    ):
        raise not_found(_("key not found"))
    return ok(_detail(_key(key_id)))


@router.put("/{int:key_id}/status", response=Envelope[KeyDetailOut])
def set_status(request: HttpRequest, key_id: int, payload: StatusIn) -> dict[str, Any]:
    """Enables (`active`, failure streak reset) or disables a key; a disabled key is
    never used nor restored automatically."""
    key = _key(key_id)
    if payload.status == KeyStatus.ACTIVE:
        key.set_status(KeyStatus.ACTIVE)
        key.consecutive_failures, key.last_error = 0, ""
    else:
        key.set_status(KeyStatus.DISABLED)
    key.save()  # a signal moves the configuration version: the proxy reloads
    return ok(_detail(key))


class TaskQuery(Schema):
    group_id: int | None = Field(None, description="that group's latest job")


@tasks_router.get("/status", response=Envelope[TasksStatusOut])
def task_status(request: HttpRequest, query: Query[TaskQuery]) -> dict[str, Any]:
    """The latest key job (or the group's), as GPT-Load's task status, and every
    unfinished job in `jobs`."""
    jobs.abandon_stale()
    rows = KeyJob.objects.select_related("group").order_by("-id")
    if query.group_id is not None:
        rows = rows.filter(group=_group(query.group_id))
    running = [jobs.describe(job) for job in rows.filter(finished_at=None)]
    return ok({**jobs.describe(rows.first()), "jobs": running})


@tasks_router.post("/{int:job_id}/cancel", response=Envelope[TaskStatusOut])
def cancel_task(request: HttpRequest, job_id: int) -> dict[str, Any]:
    """Stops an unfinished job (its worker stops at its next progress report) and frees
    its group for another job."""
    job = KeyJob.objects.select_related("group").filter(pk=job_id).first()
    if job is None:
        raise not_found(_("job not found"))
    if not job.is_running:
        message = _("job %(id)s has already finished (%(status)s)")
        raise ApiError(409, "CONFLICT", message % {"id": job_id, "status": job.status})
    jobs.cancel(job)
    job.refresh_from_db()
    return ok(jobs.describe(job))


def _group(group_id: int) -> Group:
    group = Group.objects.filter(pk=group_id).first()
    if group is None:
        raise not_found(_("group not found"))
    return group


def _key(key_id: int) -> APIKey:
    key = APIKey.objects.select_related("group").filter(pk=key_id).first()
    if key is None:
        raise not_found(_("key not found"))
    return key


def _fields(key: APIKey, schema: type[Schema]) -> dict[str, Any]:
    return {name: getattr(key, name) for name in schema.model_fields if hasattr(key, name)}


def _detail(key: APIKey) -> dict[str, Any]:
    return {**_fields(key, KeyDetailOut), "group_name": key.group.name, "masked_key": key.masked}


@contextmanager
def _refusals() -> Iterator[None]:
    """Turns refusals of the key services and jobs into GPT-Load's error responses."""
    try:
        yield
    except (services.KeyOperationError, checker.CheckError) as exc:
        raise ApiError(400, "VALIDATION_FAILED", str(exc)) from None
    except jobs.JobInProgress as exc:
        raise ApiError(409, "TASK_IN_PROGRESS", str(exc)) from None
    except jobs.JobNotQueued as exc:
        raise ApiError(503, "SERVICE_UNAVAILABLE", str(exc)) from None


def _async_input(request: HttpRequest) -> tuple[int, Iterable[str]]:
    """`(group_id, key text in pieces)` from a JSON body or a multipart upload (read from
    Django's temporary file a chunk at a time)."""
    if request.content_type == "multipart/form-data":
        upload = request.FILES.get("file")
        if upload is None:
            raise ApiError(400, "VALIDATION_FAILED", _("file: attach the key file as `file`."))
        if upload.size is not None and upload.size > MAX_UPLOAD_BYTES:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", _("The file exceeds %(size)d MiB: split it, "
                           "or use `manage.py import_keys`.")
                           % {"size": MAX_UPLOAD_BYTES // 2**20})  # fmt: skip
        raw_group = request.POST.get("group_id", "")
        if not raw_group.strip().isdigit():
            raise ApiError(
                400, "VALIDATION_FAILED", _("group_id: send the group's id as a number.")
            )
        return int(raw_group), services.decoded(upload.chunks(services.READ_CHUNK))
    try:
        # A leading BOM, as some editors save JSON, is what the other endpoints accept too.
        payload = KeysTextIn.model_validate_json(request.body.removeprefix(codecs.BOM_UTF8))
    except PydanticValidationError as exc:
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            raise ApiError(400, "INVALID_JSON", _("The request body is not valid JSON.")) from None
        raise ValidationError([dict(error) for error in exc.errors()]) from None
    return payload.group_id, [payload.keys_text]
