"""Access keys in the console: who may call the gateway, with which limits, and how much
each has used.

A key's secret is shown once, in the message that follows its creation or rotation, and
never again: the database holds only its hash and a masked hint. The usage figures come
from the request log's rollups, which `logs` owns and adds to this page's queryset
(`KEY_FIGURES`, filled by `logs/apps.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _
from unfold.admin import ModelAdmin
from unfold.contrib.filters.admin import BooleanRadioFilter, RelatedDropdownFilter
from unfold.decorators import action, display
from unfold.widgets import UnfoldAdminTextareaWidget

from access.apps import access_changed
from access.models import MAX_PATTERNS, AccessKey
from keys.admin import copy_button

WARN_SHARE = 0.9  # a budget this far used is shown in orange, a spent one in red

# Figures about access keys that apps above this one own (usage from the request log's
# rollups): each annotates the list's and the change page's queryset with
# `requests_today`, `failures_today`, `tokens_today` and the same `…_month`.
KEY_FIGURES: list[Callable[[QuerySet[AccessKey]], QuerySet[AccessKey]]] = []


class PatternsField(forms.CharField):
    """Model patterns edited one a line; the model stores them as a list."""

    def __init__(self, **kwargs: Any) -> None:
        widget = UnfoldAdminTextareaWidget(attrs={"rows": 4, "placeholder": "gpt-4o*\nclaude-*",
                                                  "spellcheck": "false"})  # fmt: skip
        super().__init__(widget=widget, **kwargs)

    def prepare_value(self, value: Any) -> Any:
        return "\n".join(str(p) for p in value) if isinstance(value, list) else value

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        if isinstance(value, list):
            return value
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]


class AccessKeyForm(forms.ModelForm):
    models = PatternsField(
        required=False,
        label=_("Models"),
        help_text=_("One glob pattern a line (gpt-4o*, claude-*), at most %(max)d; empty: "
                    "every model.") % {"max": MAX_PATTERNS},
    )  # fmt: skip

    class Meta:
        model = AccessKey
        fields = ["name", "enabled", "expires_at", "notes", "groups", "models", "rpm", "tpm",
                  "daily_tokens", "monthly_tokens", "max_concurrency"]  # fmt: skip


@admin.register(AccessKey)
class AccessKeyAdmin(ModelAdmin):
    form = AccessKeyForm
    list_display = ["name_shown", "groups_shown", "limits_shown", "state_shown", "today_shown"]
    list_filter = [("enabled", BooleanRadioFilter), ("groups", RelatedDropdownFilter)]
    list_filter_submit = True
    search_fields = ["name", "notes"]
    actions = ["enable_selected", "disable_selected"]
    actions_detail = ["rotate_key"]
    readonly_fields = ["key_hint", "usage_shown", "created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["name", "key_hint", "enabled", "expires_at", "notes"]}),
        (_("Scope"), {"fields": ["groups", "models"]}),
        (
            _("Limits"),
            {"fields": ["rpm", "tpm", "daily_tokens", "monthly_tokens", "max_concurrency"]},
        ),
        (_("Usage"), {"fields": ["usage_shown"]}),
        (_("Record"), {"classes": ["collapse"], "fields": ["created_at", "updated_at"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[AccessKey]:
        queryset = super().get_queryset(request).prefetch_related("groups")
        for annotate in KEY_FIGURES:
            queryset = annotate(queryset)
        return queryset

    def get_fieldsets(self, request: HttpRequest, obj: AccessKey | None = None) -> Any:
        if obj is not None:
            return self.fieldsets
        # A key being made has no secret yet, no usage and no record.
        shown = [(title, {**options, "fields": [f for f in options["fields"]
                                                 if f not in self.readonly_fields]})
                 for title, options in self.fieldsets]  # fmt: skip
        return [(title, options) for title, options in shown if options["fields"]]

    def save_model(self, request: HttpRequest, obj: AccessKey, form: Any, change: bool) -> None:
        if not change:
            # Kept on the request for `response_add` alone: never stored, never logged.
            request._issued_secret = obj.issue()  # type: ignore[attr-defined]
        super().save_model(request, obj, form, change)

    def response_add(
        self, request: HttpRequest, obj: AccessKey, post_url_continue: str | None = None
    ) -> HttpResponse:
        secret = getattr(request, "_issued_secret", None)
        if secret:
            self.show_secret(request, obj, secret)
            # The key's own page next, whichever button was pressed: it holds the usage.
            return HttpResponseRedirect(reverse("admin:access_accesskey_change", args=[obj.pk]))
        return super().response_add(request, obj, post_url_continue)

    def show_secret(self, request: HttpRequest, key: AccessKey, secret: str) -> None:
        """The one time a secret is shown: a message on the next page, with a copy button.

        Django's messages travel in a signed cookie (the session holds only those too big
        for it, until they are shown) and are gone once shown: the server keeps no copy.
        """
        self.message_user(request, format_html(
            '{} <code class="font-mono select-all">{}</code> {}<br>{}',
            _("Access key %(name)s:") % {"name": key.name}, secret, copy_button(secret),
            _("Copy it now: it is shown this once and cannot be read back (only its hash is "
              "kept). Lost? Rotate the key for a new one."),
        ))  # fmt: skip

    # -- list columns --

    @display(description=_("Access key"), ordering="name", header=True)
    def name_shown(self, key: AccessKey) -> tuple[str, str]:
        return key.name, key.key_hint

    @display(description=_("Groups"))
    def groups_shown(self, key: AccessKey) -> str:
        names = [group.name for group in key.groups.all()]
        return ", ".join(sorted(names)) if names else str(_("every group"))

    @display(description=_("Limits"))
    def limits_shown(self, key: AccessKey) -> str:
        parts = [
            (key.rpm, _("%(n)s requests/min")), (key.tpm, _("%(n)s tokens/min")),
            (key.daily_tokens, _("%(n)s tokens/day")),
            (key.monthly_tokens, _("%(n)s tokens/month")),
            (key.max_concurrency, _("%(n)s at once")),
        ]  # fmt: skip
        shown = [str(label) % {"n": f"{value:,}"} for value, label in parts if value]
        if key.models:
            shown.append(str(_("models: %(patterns)s")) % {"patterns": ", ".join(key.models)})
        return " · ".join(shown) if shown else str(_("no limits"))

    @display(description=_("State"), label={"on": "success", "off": "info", "expired": "danger"})
    def state_shown(self, key: AccessKey) -> tuple[str, str]:
        if key.expired(timezone.now()):
            return "expired", str(_("expired"))
        if not key.enabled:
            return "off", str(_("disabled"))
        if key.expires_at:
            when = date_format(timezone.localtime(key.expires_at), "SHORT_DATETIME_FORMAT")
            return "on", str(_("until %(time)s")) % {"time": when}
        return "on", str(_("enabled"))

    @display(description=_("Tokens today / daily limit"))
    def today_shown(self, key: Any) -> str:
        return budget(getattr(key, "tokens_today", 0), key.daily_tokens)

    @display(description=_("Today and this month"))
    def usage_shown(self, key: Any) -> str:
        """Today and this month, against the key's token budgets."""
        if not key.pk:
            return "-"
        rows = [
            (_("Today"), "today", key.daily_tokens),
            (_("This month"), "month", key.monthly_tokens),
        ]
        cells = format_html_join("", (
            '<tr><th class="pr-6 py-1 text-left font-medium">{}</th><td class="pr-6">{}</td>'
            '<td class="pr-6">{}</td><td>{}</td></tr>'
        ), (
            (label, f"{getattr(key, f'requests_{when}', 0):,}",
             f"{getattr(key, f'failures_{when}', 0):,}",
             budget(getattr(key, f"tokens_{when}", 0), limit))
            for label, when, limit in rows
        ))  # fmt: skip
        logs = reverse("admin:logs_requestlog_changelist") + f"?access_key={key.pk}"
        return format_html(
            '<table class="text-sm"><tr class="text-gray-500"><th></th><th class="pr-6 '
            'text-left font-normal">{}</th><th class="pr-6 text-left font-normal">{}</th><th '
            'class="text-left font-normal">{}</th></tr>{}</table><a class="text-primary-600 '
            'text-sm" href="{}">{}</a>',
            _("Requests"), _("Failed"), _("Tokens / limit"), cells, logs, _("Its request logs"),
        )  # fmt: skip

    # -- actions --

    @action(description=_("Enable the selected access keys"))
    def enable_selected(self, request: HttpRequest, queryset: QuerySet[AccessKey]) -> None:
        count = switch(queryset, enabled=True)
        self.message_user(request, _("%(count)d access keys enabled.") % {"count": count})

    @action(description=_("Disable the selected access keys"))
    def disable_selected(self, request: HttpRequest, queryset: QuerySet[AccessKey]) -> None:
        count = switch(queryset, enabled=False)
        self.message_user(request, _("%(count)d access keys disabled.") % {"count": count})

    @action(description=_("Rotate the secret"), icon="autorenew", url_path="rotate")
    def rotate_key(self, request: HttpRequest, object_id: str) -> HttpResponse:
        key = get_object_or_404(AccessKey, pk=object_id)
        if not self.has_change_permission(request, key):
            raise PermissionDenied
        if request.method == "POST":
            secret = key.issue()
            key.save(update_fields=["key_hash", "key_hint", "updated_at"])
            self.show_secret(request, key, secret)
            return HttpResponseRedirect(reverse("admin:access_accesskey_change", args=[key.pk]))
        return TemplateResponse(request, "admin/access/confirm_rotate.html", {
            **self.admin_site.each_context(request), "key": key, "opts": self.model._meta,
            "title": _("Rotate the secret of %(name)s?") % {"name": key.name},
        })  # fmt: skip


def switch(queryset: QuerySet[AccessKey], *, enabled: bool) -> int:
    """Turns keys on or off in one UPDATE, then tells the proxies once."""
    chosen = list(queryset.exclude(enabled=enabled).values_list("pk", flat=True))
    count = AccessKey.objects.filter(pk__in=chosen).update(
        enabled=enabled, updated_at=timezone.now()
    )
    if count:
        access_changed()
    return count


def budget(used: int, limit: int) -> str:
    """`used / limit`, orange past 90 % of it, red once spent; `used` alone without a limit."""
    if not limit:
        return f"{used:,}"
    colour = (
        "text-red-600" if used >= limit else "text-orange-500" if used >= WARN_SHARE * limit else ""
    )
    return format_html('<span class="{}">{}</span> / {}', colour, f"{used:,}", f"{limit:,}")
