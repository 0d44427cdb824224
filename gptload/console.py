"""The operators' console: Django's admin with the Unfold theme, signed in to with the
AUTH_KEY or as a Django user, failed sign-ins limited."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils.translation import gettext_lazy as _
from unfold.forms import AuthenticationForm
from unfold.sites import UnfoldAdminSite

from gptload.lib.signin import throttle, too_many_failures


class SignInForm(AuthenticationForm):
    """User and password, or the AUTH_KEY alone in the password field."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["username"].required = False
        self.fields["username"].label = _("User (leave empty to sign in with the AUTH_KEY)")
        self.fields["password"].label = _("Password or AUTH_KEY")

    def clean_username(self) -> str:
        return str(self.cleaned_data.get("username") or "")


class GptloadAdminSite(UnfoldAdminSite):
    login_form = SignInForm

    def login(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if request.method != "POST":
            return super().login(request, extra_context)
        if wait := throttle.blocked_for(request):
            messages.error(request, too_many_failures(wait))
            context = {**self.each_context(request), "title": _("Log in"), "form": self.login_form(request),
                       "app_path": request.get_full_path(), "username": ""}  # fmt: skip
            return TemplateResponse(request, "admin/login.html", context, status=429)
        response = super().login(request, extra_context)
        if request.user.is_authenticated and response.status_code == 302:
            throttle.succeeded(request)
        else:
            throttle.failed(request)
        return response
