"""Groups, keys and key jobs in the console: the operators' daily work.

Keys are never shown whole on a page: a list shows them masked, and "reveal" asks the
server for one key at a time (a user with the right to change keys). Big operations
(imports, validations) run as key jobs on the worker; their page shows live progress.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import IntegerField, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _
from django.views.decorators.http import require_POST
from unfold.admin import ModelAdmin, TabularInline
from unfold.contrib.filters.admin import ChoicesRadioFilter, RelatedDropdownFilter
from unfold.decorators import action, display

from gptload.lib.adminsecrets import SecretFieldsForm
from gptload.lib.crypto import DecryptionError, current_cipher
from gptload.lib.paging import Keyset, SeekPaging
from gptload.lib.providers import PROVIDERS
from gptload.lib.secrets import mask
from keys import checker, groups, jobs, services
from keys.models import (
    APIKey,
    Group,
    GroupSubGroup,
    JobKind,
    JobStatus,
    KeyJob,
    KeyStatus,
    KeyTally,
)
from keys.widgets import JsonRowsWidget, ProxyKeysWidget
from settings_app import registry
from settings_app.models import SystemSetting

REASON_WIDTH = 60  # characters of a key's last error shown in the key list
STATUS_LABELS = {KeyStatus.ACTIVE: "success", KeyStatus.COOLING: "warning",
                 KeyStatus.INVALID: "danger", KeyStatus.DISABLED: "info"}  # fmt: skip
TEST_LIMIT = 20  # keys tested at once from the console (a live call each)


def copy_button(text: str) -> str:
    return format_html(
        '<button type="button" class="material-symbols-outlined text-sm text-primary-600 '
        'align-middle" title="{}" onclick="navigator.clipboard.writeText(this.dataset.copy)" '
        'data-copy="{}">content_copy</button>', _("Copy"), text,
    )  # fmt: skip


# Groups -------------------------------------------------------------------------------------


class GroupForm(SecretFieldsForm):
    secret_fields = ()  # proxy keys are the group's to read back (staff): shown, with a generator

    class Meta:
        model = Group
        fields = "__all__"
        widgets = {
            "upstreams": JsonRowsWidget(
                [("url", _("Upstream URL"), "url"), ("weight", _("Weight"), "number")],
                new_row={"url": "", "weight": 1},
            ),
            "header_rules": JsonRowsWidget(
                [
                    ("key", _("Header"), "text"),
                    ("value", _("Value (${CLIENT_IP}, ${API_KEY}, …)"), "text"),
                    ("action", _("Action"), ["set", "remove"]),
                ],
                new_row={"key": "", "value": "", "action": "set"},
            ),
            "model_redirect_rules": JsonRowsWidget(
                [("from", _("Model asked for"), "text"), ("to", _("Model sent upstream"), "text")],
                mapping=("from", "to"),
            ),
            "config": JsonRowsWidget(
                [
                    ("setting", _("Setting"), sorted(registry.GROUP_OVERRIDABLE)),
                    ("value", _("Value for this group"), "text"),
                ],
                mapping=("setting", "value"),
            ),
            "param_overrides": forms.Textarea(
                attrs={"rows": 4, "placeholder": '{"temperature": 0.7}'}
            ),
            "proxy_keys": ProxyKeysWidget(),
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        system = SystemSetting.objects.typed_values()
        effective = registry.effective(None, system)
        self.fields["config"].label = _("Setting overrides")
        self.fields["config"].help_text = _(
            "Settings this group does differently. System values now: %(values)s"
        ) % {"values": ", ".join(f"{k}={effective[k]}" for k in sorted(registry.GROUP_OVERRIDABLE))}
        self.fields["channel_type"].widget.attrs["data-defaults"] = json.dumps(
            {
                c: {"upstream": p.default_upstream, "test_model": p.default_test_model}
                for c, p in PROVIDERS.items()
            }
        )

    def clean_config(self) -> dict[str, Any]:
        # The rows come as text; the registry turns each value into its type and checks it.
        raw = self.cleaned_data.get("config") or {}
        typed = {k: text_to_value(k, v) for k, v in raw.items()}
        try:
            return registry.validate_group_config(typed)
        except registry.SettingError as exc:
            raise forms.ValidationError(str(exc)) from None


def text_to_value(key: str, value: Any) -> Any:
    """A setting typed into a row (text) as the registry's type; other values as they are."""
    if not isinstance(value, str) or key not in registry.GROUP_OVERRIDABLE:
        return value
    try:
        return registry.get(key).parse(value)
    except registry.SettingError:
        return value  # the registry's check names the problem


class MemberInline(TabularInline):
    model = GroupSubGroup
    fk_name = "group"
    extra = 0
    autocomplete_fields = ["sub_group"]
    verbose_name = _("member group")
    verbose_name_plural = _("member groups (aggregate groups only)")


def annotated_groups(queryset: QuerySet[Group]) -> QuerySet[Group]:
    """Each group with its keys by state (a row of the tally each, whatever the pool's
    size), and whatever the apps above registered in `GROUP_FIGURES`."""

    def keys(status: str) -> Subquery:
        tally = KeyTally.objects.filter(group=OuterRef("pk"), status=status).values("count")
        return Subquery(tally[:1], output_field=IntegerField())

    queryset = queryset.annotate(
        active_keys=Coalesce(keys(KeyStatus.ACTIVE), 0),
        cooling_keys=Coalesce(keys(KeyStatus.COOLING), 0),
        invalid_keys=Coalesce(keys(KeyStatus.INVALID), 0),
        disabled_keys=Coalesce(keys(KeyStatus.DISABLED), 0),
    )
    for annotate in GROUP_FIGURES:
        queryset = annotate(queryset)
    return queryset


# Figures about groups that apps above this one own (the request log's 24 h traffic):
# each annotates the group list's queryset (`logs` registers its own at start-up).
GROUP_FIGURES: list[Callable[[QuerySet[Group]], QuerySet[Group]]] = []


@admin.register(Group)
class GroupAdmin(ModelAdmin):
    form = GroupForm
    list_display = ["name_shown", "channel_type", "keys_shown", "traffic_24h", "endpoint_shown",
                    "enabled", "sort"]  # fmt: skip
    list_editable = ["enabled", "sort"]
    list_filter = [
        ("channel_type", ChoicesRadioFilter),
        ("group_type", ChoicesRadioFilter),
        "enabled",
    ]
    search_fields = ["name", "display_name", "description"]
    ordering = ["sort", "-id"]
    inlines = [MemberInline]
    readonly_fields = ["endpoint_shown", "last_validated_at", "created_at", "updated_at"]
    actions = ["copy_groups"]
    actions_detail = [
        "import_keys", "validate_invalid", "clear_invalid",
        {"title": _("Export keys"), "icon": "download",
         "items": ["export_all_keys", "export_active_keys", "export_invalid_keys"]},
    ]  # fmt: skip
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "name",
                    "display_name",
                    "description",
                    "group_type",
                    "channel_type",
                    "enabled",
                    "sort",
                    "endpoint_shown",
                ]
            },
        ),
        (_("Upstreams"), {"fields": ["upstreams"]}),
        (_("Access"), {"fields": ["proxy_keys"]}),
        (_("Key checks"), {"fields": ["test_model", "validation_endpoint", "last_validated_at"]}),
        (
            _("Rules"),
            {
                "fields": [
                    "model_redirect_rules",
                    "model_redirect_strict",
                    "header_rules",
                    "param_overrides",
                ]
            },
        ),
        (_("Settings for this group"), {"fields": ["config"]}),
        (_("Record"), {"classes": ["collapse"], "fields": ["created_at", "updated_at"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Group]:
        return annotated_groups(super().get_queryset(request))

    @display(description=_("Group"), ordering="name", header=True)
    def name_shown(self, group: Group) -> tuple[str, str]:
        kind = _("aggregate") if group.is_aggregate else ""
        return group.name, " · ".join(filter(None, [group.display_name, str(kind)]))

    @display(description=_("Keys: active / cooling / invalid / disabled"))
    def keys_shown(self, group: Any) -> str:
        if group.is_aggregate:
            return "—"
        return format_html(
            '<span class="text-green-600">{}</span> / <span class="text-orange-500">{}</span> / '
            '<span class="text-red-600">{}</span> / <span class="text-gray-500">{}</span>',
            group.active_keys, group.cooling_keys, group.invalid_keys, group.disabled_keys,
        )  # fmt: skip

    @display(description=_("24 h requests, failed"))
    def traffic_24h(self, group: Any) -> str:
        ok, failed = getattr(group, "ok_24h", 0), getattr(group, "failed_24h", 0)
        total = ok + failed
        if not total:
            return "0"
        rate = 100 * failed / total
        return format_html('{} <span class="{}">({}%)</span>', f"{total:,}",
                           "text-red-600" if rate >= 5 else "text-gray-500", f"{rate:.1f}")  # fmt: skip

    @display(description=_("Endpoint"))
    def endpoint_shown(self, group: Group) -> str:
        if not group.pk:
            return "-"
        url = groups.endpoint(str(SystemSetting.objects.effective()["app_url"]), group.name)
        return format_html("<code>{}</code> {}", url, copy_button(url))

    @action(description=_("Copy the selected groups (with their keys)"))
    def copy_groups(self, request: HttpRequest, queryset: QuerySet[Group]) -> None:
        made = [groups.copy_group(group).name for group in queryset]
        self.message_user(request, _("Copied as: %(names)s") % {"names": ", ".join(made)})

    # -- deleting: the confirmation counts what goes instead of listing 100k keys --

    def get_deleted_objects(
        self, objs: Any, request: HttpRequest
    ) -> tuple[list[Any], dict[str, int], set[str], list[Any]]:
        chosen = list(objs)
        counts = groups.key_counts(group.pk for group in chosen)
        memberships = GroupSubGroup.objects.filter(
            Q(group__in=chosen) | Q(sub_group__in=chosen)
        ).count()
        summary: list[Any] = []
        for group in chosen:
            keys = counts[group.pk]
            summary.append(format_html(
                "{} <strong>{}</strong>: {}", _("Group"), group.name,
                _("%(total)s keys (%(active)s active, %(cooling)s cooling, %(invalid)s invalid, "
                  "%(disabled)s disabled)") % {
                    "total": f"{keys.total_keys:,}", "active": f"{keys.active_keys:,}",
                    "cooling": f"{keys.cooling_keys:,}", "invalid": f"{keys.invalid_keys:,}",
                    "disabled": f"{keys.disabled_keys:,}"},
            ))  # fmt: skip
        if memberships:
            summary.append(_("%(count)s aggregate memberships") % {"count": memberships})
        summary.append(_("Request logs and statistics are kept."))
        total_keys = sum(counts[group.pk].total_keys for group in chosen)
        model_count = {str(_("groups")): len(chosen), str(_("keys")): total_keys}
        if memberships:
            model_count[str(_("memberships"))] = memberships
        missing = set()
        if total_keys and not request.user.has_perm("keys.delete_apikey"):
            missing.add(str(APIKey._meta.verbose_name))
        return summary, model_count, missing, []

    def delete_model(self, request: HttpRequest, obj: Group) -> None:
        groups.delete_group(obj)  # keys in batches, no per-row signals

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Group]) -> None:
        for group in queryset:
            groups.delete_group(group)

    # -- a group's key operations (buttons on its page) --

    def changeable(self, request: HttpRequest, object_id: str) -> Group:
        """The group of a key operation, if the operator may change it (its keys)."""
        group = get_object_or_404(Group, pk=object_id)
        if not self.has_change_permission(request, group):
            raise PermissionDenied
        return group

    def page(self, request: HttpRequest, template: str, group: Group, title: str,
             **context: Any) -> TemplateResponse:  # fmt: skip
        return TemplateResponse(request, template, {
            **self.admin_site.each_context(request), "group": group, "title": title,
            "opts": self.model._meta, **context})  # fmt: skip

    @action(description=_("Import keys"), icon="upload", url_path="import-keys")
    def import_keys(self, request: HttpRequest, object_id: str) -> HttpResponse:
        group = self.changeable(request, object_id)
        form = ImportForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            try:
                job = jobs.start_import(group, form.texts())
            except (jobs.JobInProgress, jobs.JobNotQueued, services.KeyOperationError) as exc:
                form.add_error(None, str(exc))
            else:
                return HttpResponseRedirect(reverse("admin:keys_keyjob_change", args=[job.pk]))
        title = _("Import keys into %(group)s") % {"group": group.name}
        return self.page(request, "admin/keys/import_keys.html", group, title, form=form)

    @action(description=_("Validate invalid keys"), icon="verified", url_path="validate-invalid")
    def validate_invalid(self, request: HttpRequest, object_id: str) -> HttpResponse:
        group = self.changeable(request, object_id)
        return start_job(self, request, group, JobKind.VALIDATE,
                         params={"statuses": [KeyStatus.INVALID]})  # fmt: skip

    @action(description=_("Delete invalid keys"), icon="delete_sweep", url_path="clear-invalid")
    def clear_invalid(self, request: HttpRequest, object_id: str) -> HttpResponse:
        group = self.changeable(request, object_id)
        if request.method == "POST":
            deleted = services.clear_keys(group, KeyStatus.INVALID)
            self.message_user(request, _("%(count)d invalid keys deleted.") % {"count": deleted})
            return HttpResponseRedirect(reverse("admin:keys_group_change", args=[group.pk]))
        invalid = APIKey.objects.filter(group=group, status=KeyStatus.INVALID).count()
        title = _("Delete the invalid keys of %(group)s?") % {"group": group.name}
        return self.page(request, "admin/keys/confirm_clear.html", group, title, count=invalid)

    @action(description=_("All keys"), url_path="export-keys")
    def export_all_keys(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self.export(request, object_id, "all")

    @action(description=_("Active keys"), url_path="export-active-keys")
    def export_active_keys(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self.export(request, object_id, KeyStatus.ACTIVE)

    @action(description=_("Invalid keys"), url_path="export-invalid-keys")
    def export_invalid_keys(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self.export(request, object_id, KeyStatus.INVALID)

    def export(self, request: HttpRequest, object_id: str, status: str) -> HttpResponse:
        """The group's keys in that state, one per line, in plaintext (a download)."""
        group = self.changeable(request, object_id)
        text = "".join(batch.text for batch in services.export_keys(group.pk, status))
        response = HttpResponse(text, content_type="text/plain; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{group.name}-{status}-keys.txt"'
        return response


def start_job(model_admin: ModelAdmin, request: HttpRequest, group: Group, kind: JobKind,
              **options: Any) -> HttpResponse:  # fmt: skip
    """Starts a job for `group` and shows its progress (or says why it did not start)."""
    try:
        job = jobs.start(group, kind, **options)
    except (
        jobs.JobInProgress,
        jobs.JobNotQueued,
        services.KeyOperationError,
        checker.CheckError,
    ) as exc:
        model_admin.message_user(request, str(exc), messages.ERROR)
        return HttpResponseRedirect(reverse("admin:keys_group_change", args=[group.pk]))
    return HttpResponseRedirect(reverse("admin:keys_keyjob_change", args=[job.pk]))


class ImportForm(forms.Form):
    text = forms.CharField(label=_("Keys"), required=False, widget=forms.Textarea(attrs={
        "rows": 10, "placeholder": _("One key per line, or separated by spaces, commas or semicolons; "
                                     "a JSON array works too.")}))  # fmt: skip
    file = forms.FileField(label=_("…or a .txt file"), required=False)

    def texts(self) -> Iterator[str]:
        """The pasted keys, then the file's, a chunk at a time (never read whole: a 16 MiB
        file is 400,000 keys); checked as they are read, by `jobs.start_import`."""
        yield self.cleaned_data.get("text") or ""
        if upload := self.cleaned_data.get("file"):
            yield "\n"
            yield from services.decoded(upload.chunks(services.READ_CHUNK))


# Keys ---------------------------------------------------------------------------------------


@admin.register(APIKey)
class APIKeyAdmin(SeekPaging, ModelAdmin):
    list_display = ["key_shown", "group", "status_shown", "reason_shown", "cooling_until",
                    "request_count", "failure_count", "last_used_at", "notes"]  # fmt: skip
    list_filter = [("group", RelatedDropdownFilter), ("status", ChoicesRadioFilter)]
    list_filter_submit = True
    list_select_related = ["group"]
    list_per_page = 50
    search_fields = ["notes"]
    search_help_text = _("Paste a whole key to find it in every group, or search the notes.")
    # No COUNT(*) over a million keys per page; "next" seeks on (last used, id).
    keyset = Keyset("last_used_at")
    # The secret itself never appears on a page; it is set through an import or the API.
    exclude = ["key_value", "key_hash"]
    readonly_fields = ["key_shown", "group", "status_changed_at", "last_used_at", "request_count",
                       "failure_count", "consecutive_failures", "last_error", "cooling_until",
                       "created_at", "updated_at"]  # fmt: skip
    actions = ["validate_selected", "test_selected", "restore_selected", "enable_selected",
               "disable_selected", "export_selected"]  # fmt: skip

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # keys come in through a group's "Import keys"

    def get_queryset(self, request: HttpRequest) -> QuerySet[APIKey]:
        return super().get_queryset(request).order_by("-last_used_at", "-id")

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[APIKey],
                           search_term: str) -> tuple[QuerySet[APIKey], bool]:  # fmt: skip
        term = search_term.strip()
        if len(term) >= 8 and " " not in term:  # a whole key: found by its hash, in any group
            by_key = queryset.filter(key_hash=current_cipher().hash(term))
            if by_key.exists():
                return by_key, False
        return super().get_search_results(request, queryset, search_term)

    def get_urls(self) -> list[Any]:
        reveal = self.admin_site.admin_view(require_POST(self.reveal_view))
        return [
            path("<int:key_id>/reveal/", reveal, name="keys_apikey_reveal"),
            *super().get_urls(),
        ]

    def reveal_view(self, request: HttpRequest, key_id: int) -> JsonResponse:
        """One key in plaintext, for a user allowed to change keys (the reveal button)."""
        key = get_object_or_404(APIKey, pk=key_id)
        if not self.has_change_permission(request, key):
            raise PermissionDenied
        try:
            return JsonResponse({"key": key.secret})
        except DecryptionError:
            return JsonResponse(
                {"error": "cannot decrypt: stored under another ENCRYPTION_KEY"}, status=409
            )

    @display(description=_("Key"))
    def key_shown(self, key: APIKey) -> str:
        url = reverse("admin:keys_apikey_reveal", args=[key.pk])
        return format_html(
            '<span class="whitespace-nowrap"><span class="font-mono">{}</span> <button '
            'type="button" class="material-symbols-outlined text-sm text-primary-600 align-middle" '
            'title="{}" data-reveal="{}" onclick="gptloadReveal(this)">visibility</button></span>',
            key.masked, _("Reveal and copy"), url,
        )  # fmt: skip

    @display(description=_("State"), ordering="status", label=STATUS_LABELS)
    def status_shown(self, key: APIKey) -> str:
        return key.status

    @display(description=_("Why"))
    def reason_shown(self, key: APIKey) -> str:
        """The last error (upstream text, the key already masked in it), cut to fit a row."""
        error = key.last_error.strip()
        if not error:
            return "-"
        short = error if len(error) <= REASON_WIDTH else error[: REASON_WIDTH - 1] + "…"
        return format_html('<span class="text-xs" title="{}">{}</span>', error, short)

    @action(description=_("Validate the selected keys (a job per group)"))
    def validate_selected(self, request: HttpRequest, queryset: QuerySet[APIKey]) -> None:
        for group_id, key_ids in by_group(queryset):
            group = Group.objects.get(pk=group_id)
            try:
                jobs.start(group, JobKind.VALIDATE, params={"key_ids": key_ids})
            except (jobs.JobInProgress, jobs.JobNotQueued, checker.CheckError) as exc:
                self.message_user(request, f"{group.name}: {exc}", messages.ERROR)
            else:
                self.message_user(request, _("%(group)s: validating %(count)d keys (see Key jobs).")
                                  % {"group": group.name, "count": len(key_ids)})  # fmt: skip

    @action(description=_("Test the selected keys now (at most 20)"))
    def test_selected(self, request: HttpRequest, queryset: QuerySet[APIKey]) -> None:
        for group_id, key_ids in by_group(queryset[:TEST_LIMIT]):
            group = Group.objects.get(pk=group_id)
            chosen = APIKey.objects.filter(pk__in=key_ids)
            try:
                results = checker.test_keys(group, [key.secret for key in chosen])
            except (checker.CheckError, DecryptionError) as exc:
                self.message_user(request, f"{group.name}: {exc}", messages.ERROR)
                continue
            for result in results:
                level = messages.SUCCESS if result["is_valid"] else messages.WARNING
                self.message_user(request, f"{result['key_value']}: "
                                  f"{'valid' if result['is_valid'] else 'invalid'} "
                                  f"({result['duration_ms']} ms) {result['error']}", level)  # fmt: skip

    @action(description=_("Restore the selected keys (active, failures forgotten)"))
    def restore_selected(self, request: HttpRequest, queryset: QuerySet[APIKey]) -> None:
        count = set_state(queryset.exclude(status=KeyStatus.ACTIVE), KeyStatus.ACTIVE)
        self.message_user(request, _("%(count)d keys restored.") % {"count": count})

    @action(description=_("Enable the selected keys"))
    def enable_selected(self, request: HttpRequest, queryset: QuerySet[APIKey]) -> None:
        count = set_state(queryset.filter(status=KeyStatus.DISABLED), KeyStatus.ACTIVE)
        self.message_user(request, _("%(count)d keys enabled.") % {"count": count})

    @action(description=_("Disable the selected keys (never chosen until enabled)"))
    def disable_selected(self, request: HttpRequest, queryset: QuerySet[APIKey]) -> None:
        count = set_state(queryset.exclude(status=KeyStatus.DISABLED), KeyStatus.DISABLED)
        self.message_user(request, _("%(count)d keys disabled.") % {"count": count})

    @action(description=_("Export the selected keys (plaintext)"))
    def export_selected(self, request: HttpRequest, queryset: QuerySet[APIKey]) -> HttpResponse:
        if not self.has_change_permission(request):
            raise PermissionDenied
        lines = []
        for key in queryset.select_related(None).only("key_value"):
            try:
                lines.append(key.secret)
            except DecryptionError:
                continue
        response = HttpResponse("\n".join(lines) + "\n", content_type="text/plain; charset=utf-8")
        response["Content-Disposition"] = 'attachment; filename="keys.txt"'
        return response


def by_group(queryset: QuerySet[APIKey]) -> Iterable[tuple[int, list[int]]]:
    chosen: dict[int, list[int]] = {}
    for key_id, group_id in queryset.values_list("pk", "group_id"):
        chosen.setdefault(group_id, []).append(key_id)
    return chosen.items()


def set_state(queryset: QuerySet[APIKey], status: str) -> int:
    """An operator's change of state: a restored or enabled key starts afresh."""
    from keys.states import ACTIVE_AGAIN
    from settings_app.changes import group_changed

    now = timezone.now()
    fields = (
        ACTIVE_AGAIN if status == KeyStatus.ACTIVE else {"status": status, "cooling_until": None}
    )
    touched = set(queryset.values_list("group_id", flat=True))
    count = queryset.update(**fields, status_changed_at=now, updated_at=now)
    for group_id in touched:
        group_changed(group_id)
    return count


# Jobs ---------------------------------------------------------------------------------------


@admin.register(KeyJob)
class KeyJobAdmin(ModelAdmin):
    """Bulk imports, deletions and validations: started from a group's page, the API or a
    command; followed live here."""

    list_display = [
        "id",
        "kind",
        "group",
        "status_shown",
        "progress_shown",
        "created_at",
        "finished_at",
    ]
    list_filter = [("kind", ChoicesRadioFilter), ("status", ChoicesRadioFilter)]
    search_fields = ["group__name"]
    exclude = ["payload"]  # the keys of an import, encrypted: never shown
    readonly_fields = ["kind", "group", "status_shown", "progress_shown", "params", "result", "error",
                       "created_at", "started_at", "finished_at"]  # fmt: skip
    change_form_template = "admin/keys/keyjob/change_form.html"
    actions_detail = ["cancel_job"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def get_urls(self) -> list[Any]:
        progress = self.admin_site.admin_view(self.progress_view)
        return [
            path("<int:job_id>/progress/", progress, name="keys_keyjob_progress"),
            *super().get_urls(),
        ]

    def progress_view(self, request: HttpRequest, job_id: int) -> JsonResponse:
        """The job's progress, for its page to follow."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        job = get_object_or_404(KeyJob.objects.select_related("group"), pk=job_id)
        return JsonResponse({"data": jobs.describe(job)})

    @display(description=_("Status"), label={JobStatus.PENDING: "info", JobStatus.RUNNING: "warning",
             JobStatus.SUCCEEDED: "success", JobStatus.FAILED: "danger"})  # fmt: skip
    def status_shown(self, job: KeyJob) -> str:
        return job.status

    @display(description=_("Progress"))
    def progress_shown(self, job: KeyJob) -> str:
        share = 100 * job.processed // job.total if job.total else (100 if job.finished_at else 0)
        return format_html(
            '<div class="w-40 h-2 bg-base-200 rounded" title="{} / {}"><div class="h-2 rounded '
            'bg-primary-600" style="width: {}%"></div></div>', job.processed, job.total, share,
        )  # fmt: skip

    @action(description=_("Cancel"), icon="cancel", url_path="cancel")
    def cancel_job(self, request: HttpRequest, object_id: str) -> HttpResponse:
        job = get_object_or_404(KeyJob, pk=object_id)
        if not request.user.has_perm("keys.change_apikey"):
            raise PermissionDenied
        if jobs.cancel(job):
            self.message_user(request, _("The job was cancelled."))
        else:
            self.message_user(request, _("The job had already finished."), messages.WARNING)
        return HttpResponseRedirect(reverse("admin:keys_keyjob_change", args=[job.pk]))


@admin.register(GroupSubGroup)
class GroupSubGroupAdmin(ModelAdmin):
    list_display = ["group", "sub_group", "weight"]
    list_select_related = ["group", "sub_group"]
    autocomplete_fields = ["group", "sub_group"]


__all__ = ["Q", "mask"]
