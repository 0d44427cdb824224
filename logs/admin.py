from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest
from unfold.admin import ModelAdmin

from logs.models import HourlyStat, RequestLog


class ReadOnlyAdmin(ModelAdmin):
    """Rows written by the gateway itself: viewable, never edited by hand."""

    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(RequestLog)
class RequestLogAdmin(ReadOnlyAdmin):
    list_display = ["timestamp", "group_name", "model", "status_code", "is_success",
                    "request_type", "is_stream", "duration_ms", "total_tokens", "source_ip"]  # fmt: skip
    list_filter = ["is_success", "request_type", "is_stream"]
    search_fields = ["group_name", "model", "request_path"]
    date_hierarchy = "timestamp"
    exclude = ["key_value"]


@admin.register(HourlyStat)
class HourlyStatAdmin(ReadOnlyAdmin):
    list_display = ["time", "group_id", "model", "success_count", "failure_count", "total_tokens"]
    date_hierarchy = "time"
