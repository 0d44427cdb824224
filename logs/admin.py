"""Request logs and hourly statistics in the console: newest first, filtered by every
column operators ask about, exported as CSV, and never counted in full (10 M rows)."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from itertools import islice
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _
from unfold.admin import ModelAdmin
from unfold.contrib.filters.admin import (
    BooleanRadioFilter,
    ChoicesRadioFilter,
    DropdownFilter,
    RangeDateTimeFilter,
    TextFilter,
)
from unfold.decorators import action, display
from unfold.utils import parse_datetime_str

from access.models import AccessKey
from gptload.lib.crypto import DecryptionError, current_cipher
from gptload.lib.paging import Keyset, SeekPaging
from gptload.lib.secrets import mask
from keys.models import Group, GroupType
from logs.models import HourlyStat, RequestLog

EXPORT_LIMIT = 100_000  # rows in one CSV export
CSV_BATCH = 2000


class ReadOnlyAdmin(SeekPaging, ModelAdmin):
    """Rows written by the gateway itself: viewable, never edited by hand; never counted
    (millions of rows), their "next" a seek on the list's order."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class GroupFilter(DropdownFilter):
    title = _("group")
    parameter_name = "group"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            (str(pk), name) for pk, name in Group.objects.order_by("name").values_list("pk", "name")
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if not (value := self.value()) or not value.isdigit():
            return queryset
        # An aggregate's calls name it as their parent, a standard group's as their group:
        # one column, so that its (column, timestamp) index serves the newest-first page
        # (an OR of both would read every row of a 10 M-row table).
        if Group.objects.filter(pk=int(value), group_type=GroupType.AGGREGATE).exists():
            return queryset.filter(parent_group_id=int(value))
        return queryset.filter(group_id=int(value))


class AccessKeyFilter(DropdownFilter):
    """Calls made with one access key (its `(access_key_id, timestamp)` index serves it)."""

    title = _("access key")
    parameter_name = "access_key"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        keys = AccessKey.objects.order_by("name", "pk").values_list("pk", "name")
        return [(str(pk), name) for pk, name in keys]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(access_key_id=int(value)) if value and value.isdigit() else queryset


class TimeRangeFilter(RangeDateTimeFilter):
    """From and to, each a date with an optional time, in the console's time zone."""

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        bounds = {}
        for end, lookup, default in (("from", "gte", "00:00:00"), ("to", "lte", "23:59:59")):
            day = self.used_parameters.get(f"{self.parameter_name}_{end}_0")
            if not day:
                continue
            clock = self.used_parameters.get(f"{self.parameter_name}_{end}_1") or default
            moment = parse_datetime_str(f"{day} {clock}")
            if moment is None:
                messages.error(request, _("Not a date and time: %(value)s") % {
                    "value": f"{day} {clock}"})  # fmt: skip
                return queryset.none()
            bounds[f"{self.parameter_name}__{lookup}"] = timezone.make_aware(moment)
        return queryset.filter(**bounds)


class ExactTextFilter(TextFilter):
    """A text box matching one column exactly (so that its index serves it)."""

    column = ""

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = (self.value() or "").strip()
        return queryset.filter(**{self.column: value}) if value else queryset


class ModelFilter(ExactTextFilter):
    title, parameter_name, column = _("model"), "model", "model"


class StatusFilter(ExactTextFilter):
    title, parameter_name, column = _("status code"), "status", "status_code"

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = (self.value() or "").strip()
        return queryset.filter(status_code=int(value)) if value.isdigit() else queryset


class KeyFilter(TextFilter):
    """The whole upstream key, looked up by its hash (never stored in plaintext)."""

    title, parameter_name = _("upstream key"), "key"

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = (self.value() or "").strip()
        return queryset.filter(key_hash=current_cipher().hash(value)) if value else queryset


class ErrorFilter(TextFilter):
    title, parameter_name = _("error text"), "error"

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = (self.value() or "").strip()
        # Only failures carry an error; their (is_success, timestamp) index narrows the
        # scan that a text search is to them (a twelfth of the rows, or fewer).
        if not value:
            return queryset
        return queryset.filter(is_success=False, error_message__icontains=value)


@admin.register(RequestLog)
class RequestLogAdmin(ReadOnlyAdmin):
    list_display = ["timestamp", "group_shown", "model", "status_shown", "kind", "duration",
                    "tokens", "key_shown", "source_ip"]  # fmt: skip
    list_filter = [
        GroupFilter, ModelFilter, StatusFilter, ("is_success", BooleanRadioFilter),
        ("request_type", ChoicesRadioFilter), ("is_stream", BooleanRadioFilter),
        ("timestamp", TimeRangeFilter), KeyFilter, ErrorFilter, AccessKeyFilter,
    ]  # fmt: skip
    list_filter_submit = True
    list_fullwidth = True
    list_per_page = 50  # a page's rendering, not the database, is most of its time
    search_fields = ()
    ordering = ["-timestamp"]
    keyset = Keyset("timestamp")
    exclude = ["key_value", "key_hash"]
    readonly_fields = ["key_shown"]
    actions_list = ["export_csv"]

    @display(description=_("Group"), ordering="group_name")
    def group_shown(self, row: RequestLog) -> str:
        if row.parent_group_name:
            return f"{row.parent_group_name} → {row.group_name}"
        return row.group_name

    @display(description=_("Status"), ordering="status_code", label={"ok": "success",
             "retry": "warning", "error": "danger"})  # fmt: skip
    def status_shown(self, row: RequestLog) -> tuple[str, str]:
        state = "ok" if row.is_success else ("retry" if row.request_type == "retry" else "error")
        return state, str(row.status_code)

    @display(description=_("Kind"))
    def kind(self, row: RequestLog) -> str:
        return f"{row.request_type}{' · stream' if row.is_stream else ''}"

    @display(description=_("Time"), ordering="duration_ms")
    def duration(self, row: RequestLog) -> str:
        return f"{row.duration_ms:,} ms"

    @display(description=_("Tokens"))
    def tokens(self, row: RequestLog) -> str:
        if row.total_tokens is None:
            return "-"
        return format_html('<span title="{} in, {} out">{}</span>', row.prompt_tokens or 0,
                           row.completion_tokens or 0, f"{row.total_tokens:,}")  # fmt: skip

    @display(description=_("Key"))
    def key_shown(self, row: RequestLog) -> str:
        return shown_key(row.key_value)

    @action(description=_("Export as CSV"), icon="download", url_path="export-csv")
    def export_csv(self, request: HttpRequest) -> HttpResponseBase:
        """The rows the current filters select (at most EXPORT_LIMIT), newest first."""
        changelist = self.get_changelist_instance(request)
        rows = changelist.get_queryset(request).order_by("-timestamp")[:EXPORT_LIMIT]
        response = StreamingHttpResponse(csv_lines(rows), content_type="text/csv")
        response["Content-Disposition"] = 'attachment; filename="request-logs.csv"'
        return response


CSV_COLUMNS = ("timestamp", "group_name", "parent_group_name", "model", "status_code", "is_success",
               "request_type", "is_stream", "duration_ms", "prompt_tokens", "completion_tokens",
               "total_tokens", "source_ip", "request_path", "upstream_addr", "error_message")  # fmt: skip


async def csv_lines(rows: QuerySet[RequestLog]) -> AsyncIterator[str]:
    """The CSV in batches of rows, each read in Django's sync thread (under ASGI a sync
    iterator would be read whole before the first byte goes out)."""
    lines = io.StringIO()
    writer = csv.writer(lines, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, "key"])
    yield lines.getvalue()
    cursor = rows.iterator(CSV_BATCH)

    def next_batch() -> str:
        lines.seek(0)
        lines.truncate()
        for row in islice(cursor, CSV_BATCH):
            writer.writerow([*(getattr(row, c) for c in CSV_COLUMNS), shown_key(row.key_value)])
        return lines.getvalue()

    while chunk := await sync_to_async(next_batch)():
        yield chunk


def shown_key(stored: str) -> str:
    if not stored:
        return "-"
    try:
        return mask(current_cipher().decrypt(stored))
    except DecryptionError:
        return "(cannot decrypt)"


@admin.register(HourlyStat)
class HourlyStatAdmin(ReadOnlyAdmin):
    list_display = ["time", "group_id", "model", "success_count", "failure_count", "total_tokens"]
    list_filter = [("time", TimeRangeFilter)]
    list_filter_submit = True
    ordering = ["-time"]
    keyset = Keyset("time")
