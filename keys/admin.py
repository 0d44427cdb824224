from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from unfold.admin import ModelAdmin, TabularInline

from gptload.lib.adminsecrets import SecretFieldsForm
from keys.models import APIKey, Group, GroupSubGroup, KeyJob


class GroupForm(SecretFieldsForm):
    secret_fields = ("proxy_keys",)

    class Meta:
        model = Group
        fields = "__all__"


class MemberInline(TabularInline):
    model = GroupSubGroup
    fk_name = "group"
    extra = 0
    autocomplete_fields = ["sub_group"]


@admin.register(Group)
class GroupAdmin(ModelAdmin):
    form = GroupForm
    list_display = [
        "name",
        "display_name",
        "group_type",
        "channel_type",
        "enabled",
        "sort",
        "updated_at",
    ]
    list_filter = ["group_type", "channel_type", "enabled"]
    search_fields = ["name", "display_name", "description"]
    ordering = ["sort", "-id"]
    inlines = [MemberInline]
    readonly_fields = ["last_validated_at", "created_at", "updated_at"]


@admin.register(APIKey)
class APIKeyAdmin(ModelAdmin):
    list_display = ["masked", "group", "status", "cooling_until", "consecutive_failures",
                    "failure_count", "request_count", "last_used_at"]  # fmt: skip
    list_filter = ["status", "group"]
    list_select_related = ["group"]
    search_fields = ["notes"]
    # The secret itself never appears on a page; it is set through import or the API.
    exclude = ["key_value", "key_hash"]
    readonly_fields = ["masked", "status_changed_at", "last_used_at", "request_count",
                       "failure_count", "consecutive_failures", "last_error",
                       "created_at", "updated_at"]  # fmt: skip
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[APIKey]:
        return super().get_queryset(request).order_by("-last_used_at", "-id")


@admin.register(GroupSubGroup)
class GroupSubGroupAdmin(ModelAdmin):
    list_display = ["group", "sub_group", "weight"]
    list_select_related = ["group", "sub_group"]
    autocomplete_fields = ["group", "sub_group"]


@admin.register(KeyJob)
class KeyJobAdmin(ModelAdmin):
    """Bulk imports, deletes and validations: read-only; the API and commands start them."""

    list_display = ("id", "kind", "group", "status", "processed", "total", "created_at",
                    "finished_at")  # fmt: skip
    list_filter = ("kind", "status")
    search_fields = ("group__name",)
    exclude = ("payload",)  # the keys of an import, encrypted: never shown
    readonly_fields = ("kind", "group", "status", "processed", "total", "params", "result",
                       "error", "created_at", "updated_at", "started_at", "finished_at")  # fmt: skip

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
