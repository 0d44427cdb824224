"""Middleware (first in `MIDDLEWARE`): every `/api/` error in the API's error shape.

The API's own exception handlers (`gptload.lib.api`) shape what its operations raise;
two kinds of error never reach them: a method an endpoint does not take, which ninja
answers with a bare `405 Method not allowed` of its own, and an error raised before the
API is reached (in a middleware), which gets Django's HTML page. This answers those as
`{"code": "METHOD_NOT_ALLOWED", "message": "…"}` and so on, in the caller's language.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.utils import translation
from django.utils.decorators import sync_and_async_middleware
from django.utils.translation import gettext as _

from gptload.lib.api import STATUS_CODES, error


@sync_and_async_middleware
def api_errors(get_response: Any) -> Any:
    if iscoroutinefunction(get_response):

        async def middleware_async(request: HttpRequest) -> HttpResponseBase:
            return reshaped(request, await get_response(request))

        return middleware_async

    def middleware(request: HttpRequest) -> HttpResponseBase:
        return reshaped(request, get_response(request))

    return middleware


def reshaped(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
    """`response` itself, unless it is an `/api/` error that is not JSON."""
    if (
        response.status_code < 400
        or not request.path.startswith("/api/")
        or response.get("Content-Type", "").startswith("application/json")
    ):
        return response
    status = response.status_code
    with translation.override(translation.get_language_from_request(request)):
        if status == 405:
            allowed = response.get("Allow", "")
            message = _("%(method)s is not allowed on %(path)s; use %(allowed)s.") % {
                "method": request.method, "path": request.path, "allowed": allowed}  # fmt: skip
            shaped = error(request, 405, "METHOD_NOT_ALLOWED", message)
            shaped["Allow"] = allowed
            return shaped
        if status >= 500:
            return error(request, status, "INTERNAL_SERVER_ERROR",
                         _("gptload failed to handle this request."))  # fmt: skip
        return error(request, status, STATUS_CODES.get(status, "BAD_REQUEST"),
                     _("The request was refused (HTTP %(status)d).") % {"status": status})  # fmt: skip
