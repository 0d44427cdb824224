"""`/api/auth/login`, `/api/channel-types` and `/api/integration/info`."""

from __future__ import annotations

from django.http import HttpRequest
from django.utils.translation import gettext as _
from ninja import Field, Router, Schema
from ninja.responses import Status

from gptload.lib.api import ApiError, Envelope, is_admin_key, ok
from gptload.lib.secrets import constant_time_in
from gptload.lib.signin import throttle, too_many_failures
from keys.models import ChannelType, Group
from settings_app.models import SystemSetting

router = Router(tags=["system"])


class LoginIn(Schema):
    auth_key: str = Field(max_length=4096)


class LoginOut(Schema):
    success: bool
    message: str


@router.post("/auth/login", auth=None, response={200: LoginOut, 401: LoginOut, 429: LoginOut})
def login(request: HttpRequest, payload: LoginIn) -> Status[dict[str, object]]:
    """Checks an admin key, as GPT-Load's login page does (no session is created); failed
    attempts count against the caller's address as the console's sign-in does."""
    if wait := throttle.blocked_for(request):
        return Status(429, {"success": False, "message": too_many_failures(wait)})
    if is_admin_key(payload.auth_key):
        throttle.succeeded(request)
        return Status(200, {"success": True, "message": _("Authentication successful")})
    throttle.failed(request)
    return Status(401, {"success": False, "message": _("Authentication failed")})


@router.get("/channel-types", response=Envelope[list[str]])
def channel_types(request: HttpRequest) -> dict[str, object]:
    return ok(list(ChannelType.values))


class IntegrationGroup(Schema):
    name: str
    display_name: str
    channel_type: str
    path: str


@router.get("/integration/info", auth=None, response=Envelope[list[IntegrationGroup]])
def integration_info(request: HttpRequest, key: str = "") -> dict[str, object]:
    """The groups a proxy key opens (New API's one-click import). The proxy key, not the
    admin key, is the credential here, so it comes as `?key=` as in GPT-Load."""
    global_keys = str(SystemSetting.objects.effective()["proxy_keys"]).split(",")
    everywhere = bool(key) and constant_time_in(key, tuple(k for k in global_keys if k))
    groups = [
        {"name": g.name, "display_name": g.display_name or g.name,
         "channel_type": g.channel_type, "path": f"/proxy/{g.name}"}
        for g in Group.objects.filter(enabled=True).order_by("sort", "id")
        if key and (everywhere or constant_time_in(key, tuple(g.proxy_key_list)))
    ]  # fmt: skip
    if not groups:
        raise ApiError(400, "BAD_REQUEST", _("Invalid or unauthorized proxy key"))
    return ok(groups)
