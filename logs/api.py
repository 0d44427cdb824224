"""`/api/logs`, `/api/logs/export` and `/api/dashboard/*` (REFERENCE.md §5.5, §5.6, §3.8).

The log listing filters on indexed columns where GPT-Load's filters allow it (key hash,
status code, request type, time); the dashboard reads the hourly rollups, never the log
table, except for the requests-per-minute card (20 minutes of `final` rows through the
`(request_type, timestamp)` index).
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, Literal

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db.models import F, QuerySet, Window
from django.db.models.functions import RowNumber
from django.http import HttpRequest, StreamingHttpResponse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from ninja import Field, Query, Router, Schema
from pydantic import field_validator

from gptload.lib.api import (
    MAX_ID,
    ApiError,
    Envelope,
    Page,
    PageQuery,
    blank_allowed,
    is_blank,
    not_found,
    ok,
    paginate,
)
from gptload.lib.crypto import Cipher, DecryptionError, current_cipher
from gptload.lib.paging import Keyset
from gptload.lib.secrets import mask
from keys.api_groups import KeyStatsOut, get_group
from keys.models import APIKey, Group
from logs import dashboard
from logs.models import RequestLog
from logs.stats import group_stats as stats_of_group

router = Router(tags=["logs"])
UNDECRYPTABLE = "failed-to-decrypt"
EXPORT_BATCH = 1000
LOG_ORDER = Keyset("timestamp")  # newest first; ties by id (the log_time index holds it)
# "+08:00" in an unencoded query string arrives as " 08:00"; put the plus sign back.
SPACED_OFFSET = re.compile(r" (\d{2}(?::?\d{2})?)$")


# --- logs -------------------------------------------------------------------------------


class LogFilters(Schema):
    """GPT-Load's log filters. An empty parameter (`?status_code=`) means no filter."""

    parent_group_name: str | None = Field(None, description="Substring, case-insensitive.")
    group_name: str | None = Field(None, description="Substring, case-insensitive.")
    model: str | None = Field(None, description="Substring, case-insensitive.")
    key_value: str | None = Field(None, description="The exact upstream key (matched by hash).")
    is_success: bool | None = Field(None, json_schema_extra=blank_allowed)
    request_type: Literal["retry", "final"] | None = Field(None, json_schema_extra=blank_allowed)
    status_code: int | None = Field(None, ge=100, le=999, json_schema_extra=blank_allowed)
    source_ip: str | None = Field(None, description="Exact client address.")
    error_contains: str | None = Field(None, description="Substring of the error message.")
    start_time: str | None = Field(None, description="ISO 8601 / RFC 3339, inclusive.")
    end_time: str | None = Field(None, description="ISO 8601 / RFC 3339, inclusive.")
    access_key_id: int | None = Field(
        None, ge=1, le=MAX_ID, description="Calls made with this access key (gptload's own).",
        json_schema_extra=blank_allowed,
    )  # fmt: skip

    @field_validator("*", mode="before")
    @classmethod
    def blank_is_absent(cls, value: Any) -> Any:
        return None if is_blank(value) else value


class LogOut(Schema):
    id: str
    timestamp: datetime
    group_id: int | None
    group_name: str
    parent_group_id: int | None
    parent_group_name: str
    key_value: str = Field(description=f"The upstream key, masked, or {UNDECRYPTABLE!r}.")
    masked_key: str
    key_hash: str
    model: str
    is_success: bool
    source_ip: str
    status_code: int
    request_path: str
    duration_ms: int
    error_message: str
    user_agent: str
    request_type: str
    upstream_addr: str
    is_stream: bool
    request_body: str
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    access_key_id: int | None = Field(description="The client's access key, if it used one.")


def parse_time(name: str, raw: str) -> datetime:
    """An ISO 8601 instant; without an offset it is read in the server's TZ."""
    text = SPACED_OFFSET.sub(r"+\1", raw.strip())
    try:
        value = datetime.fromisoformat(text)
        if timezone.is_naive(value):
            value = timezone.make_aware(value)
        return value.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ApiError(400, "BAD_REQUEST", _("%(name)s: %(value)s is not an ISO 8601 time such "
                       "as 2026-01-31T08:00:00Z or 2026-01-31T16:00:00+08:00")
                       % {"name": name, "value": repr(raw)}) from None  # fmt: skip


def filtered_logs(filters: LogFilters) -> QuerySet[RequestLog]:
    """The log rows that pass `filters`; raises `ApiError` (400) for a bad time."""
    rows = RequestLog.objects.all()
    # Substring filters (as GPT-Load's LIKE) cannot use an index: counting their matches
    # scans the table, about 150 ms per million rows on SQLite. The others are indexed.
    for field in ("parent_group_name", "group_name", "model"):
        if value := getattr(filters, field):
            rows = rows.filter(**{f"{field}__icontains": value.strip()})
    if filters.key_value:
        rows = rows.filter(key_hash=current_cipher().hash(filters.key_value.strip()))
    if filters.is_success is not None:
        rows = rows.filter(is_success=filters.is_success)
    if filters.request_type:
        rows = rows.filter(request_type=filters.request_type)
    if filters.status_code is not None:
        rows = rows.filter(status_code=filters.status_code)
    if filters.source_ip:
        rows = rows.filter(source_ip=filters.source_ip.strip())
    if filters.error_contains:
        rows = rows.filter(error_message__icontains=filters.error_contains)
    if filters.access_key_id is not None:
        rows = rows.filter(access_key_id=filters.access_key_id)
    start = parse_time("start_time", filters.start_time) if filters.start_time else None
    end = parse_time("end_time", filters.end_time) if filters.end_time else None
    if start and end and start > end:
        raise ApiError(400, "BAD_REQUEST", _("start_time must not be later than end_time"))
    if start:
        rows = rows.filter(timestamp__gte=start)
    if end:
        rows = rows.filter(timestamp__lte=end)
    return rows


class KeyReveal:
    """Decrypts stored key values for display, once per distinct value."""

    def __init__(self, cipher: Cipher) -> None:
        self.cipher = cipher
        self.seen: dict[str, str] = {}

    def __call__(self, stored: str) -> str:
        if not stored:
            return ""
        if stored not in self.seen:
            try:
                self.seen[stored] = self.cipher.decrypt(stored)
            except DecryptionError:
                self.seen[stored] = UNDECRYPTABLE
        return self.seen[stored]


def log_rows(rows: Iterable[RequestLog]) -> list[dict[str, Any]]:
    reveal = KeyReveal(current_cipher())
    items = []
    for row in rows:
        plain = reveal(row.key_value)
        shown = plain if plain == UNDECRYPTABLE else mask(plain)
        items.append({
            **{f.attname: getattr(row, f.attname) for f in RequestLog._meta.concrete_fields},
            "id": str(row.id),
            # Shown masked: a key in plaintext belongs to the key list and the exports.
            "key_value": shown,
            "masked_key": shown,
        })  # fmt: skip
    return items


@router.get("/logs", response=Envelope[Page[LogOut]])
def list_logs(
    request: HttpRequest, filters: Query[LogFilters], pages: Query[PageQuery]
) -> dict[str, Any]:
    """Request logs, newest first, one row per upstream attempt, with the key masked
    (`sk-a…wxyz`; filter by the whole key with `key_value`). `page_size` is at most 1000.
    Page by `page`, or follow `next_cursor`: a seek, as quick at any depth, and rows
    written meanwhile never shift a walk (each row comes once)."""
    return ok(paginate(filtered_logs(filters), pages, LOG_ORDER, log_rows))


def latest_per_key(rows: QuerySet[RequestLog], after: str) -> tuple[str, list[tuple[str, ...]]]:
    """The next batch of distinct key hashes above `after`, each with its newest log row.

    Two steps so that each stays on the `(key_hash, timestamp)` index: the distinct hashes
    of the batch, then ROW_NUMBER() over only their rows (SQLite ≥ 3.25, MariaDB ≥ 10.2).
    """
    hashes = list(
        rows.filter(key_hash__gt=after)
        .order_by("key_hash")
        .values_list("key_hash", flat=True)
        .distinct()[:EXPORT_BATCH]
    )
    if not hashes:
        return "", []
    newest = Window(
        RowNumber(), partition_by=[F("key_hash")], order_by=[F("timestamp").desc(), F("id").desc()]
    )
    latest = (
        rows.filter(key_hash__in=hashes)
        .annotate(rank=newest)
        .filter(rank=1)
        .order_by("key_hash")
        .values_list("key_value", "group_name", "status_code")
    )
    return hashes[-1], [tuple(str(v) for v in row) for row in latest]


def csv_text(rows: Iterable[Iterable[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def export_chunks(rows: QuerySet[RequestLog]) -> Iterator[str]:
    reveal = KeyReveal(current_cipher())
    yield csv_text([("key_value", "group_name", "status_code")])
    after = ""
    while True:
        after, batch = latest_per_key(rows, after)
        if not batch:
            return
        yield csv_text((reveal(key), group, status) for key, group, status in batch)


async def export_chunks_async(rows: QuerySet[RequestLog]) -> AsyncIterator[str]:
    # Under ASGI, Django would buffer a sync iterator whole; each batch hops to a thread.
    reveal = KeyReveal(current_cipher())
    yield csv_text([("key_value", "group_name", "status_code")])
    after = ""
    while True:
        after, batch = await sync_to_async(latest_per_key)(rows, after)
        if not batch:
            return
        yield csv_text((reveal(key), group, status) for key, group, status in batch)


CSV_DOC = {"description": "CSV with the columns key_value, group_name, status_code.",
           "content": {"text/csv": {"schema": {"type": "string"}}}}  # fmt: skip


@router.get("/logs/export", openapi_extra={"responses": {200: CSV_DOC}})
def export_log_keys(request: HttpRequest, filters: Query[LogFilters]) -> StreamingHttpResponse:
    """The distinct upstream keys of the filtered logs as CSV (`key_value, group_name,
    status_code`), each with its newest matching log row, e.g. to export the keys that
    produced 401s. Streamed as `log_keys_export_{yyyymmddhhmmss}.csv`."""
    rows = filtered_logs(filters)
    chunks = export_chunks_async(rows) if isinstance(request, ASGIRequest) else export_chunks(rows)
    stamp = timezone.localtime().strftime("%Y%m%d%H%M%S")
    return StreamingHttpResponse(chunks, content_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="log_keys_export_{stamp}.csv"',
        "Cache-Control": "no-store",
    })  # fmt: skip


# --- dashboard --------------------------------------------------------------------------


class StatCard(Schema):
    value: float
    sub_value: int | None = None
    sub_value_tip: str | None = None
    trend: float = Field(0.0, description="Change vs the previous period, in %.")
    trend_is_growth: bool = Field(True, description="Whether the change is good news.")


class KeyCard(StatCard):
    invalid: int
    cooling: int
    disabled: int


class TokenCard(StatCard):
    prompt_tokens: int
    completion_tokens: int


class SecurityWarning(Schema):
    type: str = Field(description="The secret concerned, by name (never its value).")
    message: str
    severity: Literal["high", "medium", "low"]
    suggestion: str


class DashboardStats(Schema):
    key_count: KeyCard
    rpm: StatCard
    request_count: StatCard
    error_rate: StatCard = Field(description="Failures in % of requests; trend in points.")
    token_count: TokenCard
    security_warnings: list[SecurityWarning]


class RequestStatsOut(Schema):
    total_requests: int
    failed_requests: int
    failure_rate: float


class GroupStatsOut(Schema):
    key_stats: KeyStatsOut
    stats_24_hour: RequestStatsOut
    stats_7_day: RequestStatsOut
    stats_30_day: RequestStatsOut


@router.get("/groups/{group_id}/stats", tags=["groups"], response=Envelope[GroupStatsOut])
def group_stats(request: HttpRequest, group_id: int) -> dict[str, Any]:
    """Keys per status and final requests of the last 24 h, 7 and 30 days (current hour
    included). For an aggregate, `key_stats` counts its members' keys."""
    return ok(stats_of_group(get_group(group_id)))


@router.get("/dashboard/stats", tags=["dashboard"], response=Envelope[DashboardStats])
def dashboard_stats(request: HttpRequest) -> dict[str, Any]:
    """The dashboard cards: keys by state, requests per minute (last 10 minutes of final
    attempts vs the 10 before), requests, error rate and tokens over the last 24 hours vs
    the 24 before (standard groups only, so that aggregate traffic is not counted twice),
    and warnings about weak or missing secrets."""
    return ok(dashboard.stats())


class ChartSeries(Schema):
    label: str
    data: list[int]
    color: str


class Chart(Schema):
    labels: list[str] = Field(description="Start of each hour, UTC, RFC 3339.")
    datasets: list[ChartSeries]


class ChartQuery(Schema):
    group_id: int | None = Field(
        None, alias="groupId", description="One group; else all.", json_schema_extra=blank_allowed
    )

    @field_validator("group_id", mode="before")
    @classmethod
    def blank_is_absent(cls, value: Any) -> Any:
        return None if is_blank(value) else value


@router.get("/dashboard/chart", tags=["dashboard"], response=Envelope[Chart])
def dashboard_chart(request: HttpRequest, query: Query[ChartQuery]) -> dict[str, Any]:
    """Successful and failed requests per hour over the last 24 hours (the current hour
    last), for one group (`groupId`, aggregates included) or for all standard groups."""
    group_id = query.group_id
    if group_id is not None and not Group.objects.filter(pk=group_id).exists():
        raise not_found(_("group %(id)s not found") % {"id": group_id})
    return ok(dashboard.hourly_chart(24, group_id))


class EncryptionStatus(Schema):
    has_mismatch: bool
    scenario_type: Literal["", "data_not_encrypted", "key_not_configured", "key_mismatch"]
    message: str
    suggestion: str


SAMPLE_SIZE = 20
MISMATCHES = {
    "data_not_encrypted": (
        gettext_lazy("ENCRYPTION_KEY is set, but the stored keys are plaintext."),
        gettext_lazy("Encrypt the stored keys with this ENCRYPTION_KEY, or unset ENCRYPTION_KEY."),
    ),
    "key_not_configured": (
        gettext_lazy(
            "The stored keys are encrypted, but ENCRYPTION_KEY is not set: they cannot be used."
        ),
        gettext_lazy("Set ENCRYPTION_KEY to the key the data was encrypted with and restart."),
    ),
    "key_mismatch": (
        gettext_lazy(
            "The stored keys are encrypted with another ENCRYPTION_KEY than the one configured."
        ),
        gettext_lazy("Set ENCRYPTION_KEY back to the key the data was encrypted with and restart."),
    ),
}


def encryption_mismatch() -> str:
    """The mismatch between ENCRYPTION_KEY and the stored keys, judged on a sample; ""."""
    sample = list(
        APIKey.objects.exclude(key_hash="")
        .order_by("-id")
        .values_list("key_value", "key_hash")[:SAMPLE_SIZE]
    )
    if not sample:
        return ""
    plain = Cipher("")
    plain_share = sum(plain.hash(value) == digest for value, digest in sample) / len(sample)
    cipher = current_cipher()
    if not cipher.enabled:
        return "key_not_configured" if plain_share < 0.2 else ""
    if plain_share > 0.8:
        return "data_not_encrypted"
    readable = 0
    for value, digest in sample:
        with contextlib.suppress(DecryptionError):
            readable += cipher.hash(cipher.decrypt(value)) == digest
    return "key_mismatch" if plain_share < 0.2 and readable / len(sample) < 0.2 else ""


@router.get("/dashboard/encryption-status", tags=["dashboard"], response=Envelope[EncryptionStatus])
def encryption_status(request: HttpRequest) -> dict[str, Any]:
    """Whether ENCRYPTION_KEY fits the stored keys, judged on the 20 newest: set but the
    data is plaintext, unset but the data is encrypted, or set to another key."""
    scenario = encryption_mismatch()
    message, suggestion = MISMATCHES.get(scenario, ("", ""))
    return ok({"has_mismatch": bool(scenario), "scenario_type": scenario,
               "message": str(message), "suggestion": str(suggestion)})  # fmt: skip
