"""`/api/`: the management REST API, with GPT-Load's paths and shapes (REFERENCE.md §5).

Every success is the envelope `{"code": 0, "message": "success", "data": …}`; every
error is `{"code": "UPPER_SNAKE", "message": "…"}` with its HTTP status, whatever raised
it (a refusal of ours, a validation error of ninja or of a model, a duplicate row, a body
that is not JSON, a bug). Lists page as `{items, pagination}`.

`message` is in the caller's language (`Accept-Language`: English, Simplified Chinese or
Japanese, as GPT-Load), so each one is translated where it is raised, inside the
request; `code` never is: clients match on it.

Auth: `AUTH_KEY` as `Authorization: Bearer`, `X-Api-Key` or `X-Goog-Api-Key` (constant
time), or the session of a staff user logged in to the admin (with CSRF) who holds the
console's permission for the area (`AREAS`; superusers hold all). Never `?key=`: it would
end up in access logs.
"""

from __future__ import annotations

import codecs
import logging
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar, cast

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.core.exceptions import ValidationError as ModelValidationError
from django.db import DataError, IntegrityError
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.http.multipartparser import MultiPartParserError
from django.utils.datastructures import MultiValueDict
from django.utils.translation import gettext as _
from django.views.decorators.csrf import csrf_exempt
from ninja import Field, NinjaAPI, Schema
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.parser import Parser
from ninja.security import APIKeyHeader, HttpBearer, SessionAuth
from ninja.utils import check_csrf
from pydantic_core import from_json

from gptload.lib.paging import BadCursor, Keyset, capped_count
from gptload.lib.secrets import constant_time_in
from gptload.lib.signin import throttle, too_many_failures

log = logging.getLogger("gptload.api")
T = TypeVar("T")
MAX_PAGE_SIZE = 1000
COUNT_AHEAD = 10_000  # rows counted past a page's start, at most
MAX_ID = 2**63 - 1  # the largest primary key (BIGINT) on every database
MAX_INT = 2**31 - 1  # the largest value of an IntegerField column on MySQL
STATUS_CODES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND",
                405: "METHOD_NOT_ALLOWED", 409: "CONFLICT", 413: "PAYLOAD_TOO_LARGE",
                422: "VALIDATION_FAILED", 429: "TOO_MANY_REQUESTS", 503: "SERVICE_UNAVAILABLE"}  # fmt: skip


class ApiError(Exception):
    """A refusal with GPT-Load's error code, e.g. `ApiError(409, "TASK_IN_PROGRESS", "…")`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def not_found(message: str) -> ApiError:
    """A 404 whose `message` is a whole translated sentence, e.g. "group 5 not found"."""
    return ApiError(404, "NOT_FOUND", message)


class Envelope(Schema, Generic[T]):
    code: int = 0
    message: str = "success"
    data: T


class Pagination(Schema):
    page: int | None = Field(description="The page number; null on a page read by cursor.")
    page_size: int
    total_items: int = Field(description="Exact when total_exact; else a lower bound.")
    total_pages: int
    total_exact: bool = Field(description="False when counting stopped early (a long list).")
    next_cursor: str | None = Field(
        description="Send as `cursor` for the next page (same order, same filters); null "
        "on the last page."
    )


class Page(Schema, Generic[T]):
    items: list[T]
    pagination: Pagination


class ErrorOut(Schema):
    code: str
    message: str


def ok(data: Any = None, message: str | None = None) -> dict[str, Any]:
    return {"code": 0, "message": _("success") if message is None else message, "data": data}


def paginate(
    rows: QuerySet[Any],
    pages: PageQuery,
    keyset: Keyset,
    convert: Callable[[Iterable[Any]], list[Any]] = list,
) -> dict[str, Any]:
    """One page of `rows` in `keyset`'s order, GPT-Load's shape plus a cursor.

    By `page` (GPT-Load's way) the rows before the page are skipped by offset: cost grows
    with the depth, so the ids are read first, off the index, then the page's rows. By
    `cursor` (from the previous page's `next_cursor`) the page is a seek on the index,
    as quick at any depth. Rows are counted up to `COUNT_AHEAD` past the page's start, no
    further (`total_exact` false beyond): a COUNT(*) of 10 M log rows takes seconds.
    """
    size = pages.page_size
    if pages.cursor is not None:
        try:
            found = keyset.after(rows, pages.cursor or None, size + 1)
        except BadCursor:
            raise ApiError(400, "BAD_REQUEST", _("cursor: not a cursor of this list; send a "
                           "next_cursor as it was given, or leave cursor out.")) from None  # fmt: skip
        items, more = found[:size], len(found) > size
        limit = COUNT_AHEAD
        page = None
    else:
        start = (pages.page - 1) * size
        limit = min(start + size + COUNT_AHEAD, MAX_ID)
        page, more = pages.page, False
        items = []
    total = capped_count(rows, limit)
    if page is not None:
        # A page past the end is empty without asking: an OFFSET beyond 2^63 is an SQL error.
        items = (
            list(_offset_page(rows.order_by(*keyset.order), start, size)) if start < total else []
        )
        more = start + len(items) < total
    return {
        "items": convert(items),
        "pagination": {
            "page": page,
            "page_size": size,
            "total_items": total,
            "total_pages": math.ceil(total / size) if total else 0,
            "total_exact": total < limit,
            "next_cursor": keyset.cursor(items[-1]) if more and items else None,
        },
    }


def _offset_page(rows: QuerySet[Any], start: int, size: int) -> Any:
    if start == 0:
        return rows[:size]
    ids = list(rows.values_list("pk", flat=True)[start : start + size])
    return rows.filter(pk__in=ids) if ids else []


# Blank as both Python and JSON Schema (ECMA 262) see it: `str.isspace()` also takes
# control characters such as \x1c, which a documented `\s` would not match.
BLANK = r"[ \t\r\n\f\v]*"


def is_blank(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(BLANK, value) is not None


def blank_allowed(schema: dict[str, Any]) -> None:
    """`json_schema_extra` of a query filter that an empty value (`?status_code=`) turns
    off, as GPT-Load's web UI sends them: the schema then says so."""
    schema.setdefault("anyOf", []).append({"type": "string", "pattern": f"^{BLANK}$"})


class PageQuery(Schema):
    """`page` (from 1) and `page_size` (1-1000) of a listing, or `cursor`."""

    page: int = Field(1, ge=1)
    page_size: int = Field(15, ge=1, le=MAX_PAGE_SIZE)
    cursor: str | None = Field(
        None,
        max_length=500,
        description="The previous page's `next_cursor`: the next page, read by a seek at "
        "any depth (`page` is then ignored). Empty: the first page, by cursor.",
    )


def is_admin_key(key: str | None) -> bool:
    return bool(key) and constant_time_in(key or "", (settings.AUTH_KEY,))


def admitted(request: HttpRequest, key: str | None) -> bool | None:
    """Whether `key` is the AUTH_KEY. Wrong keys count as failed sign-ins of the caller's
    address (`gptload.lib.signin.throttle`, shared with the console and /api/auth/login):
    past the limit every key is refused with 429 until the window ends, the right one
    too, so that guessing it stops paying."""
    if not key:
        return None
    if wait := throttle.blocked_for(request):
        raise ApiError(429, "TOO_MANY_REQUESTS", too_many_failures(wait))
    if is_admin_key(key):
        return True
    throttle.failed(request)
    return None


class BearerKey(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> bool | None:
        return admitted(request, token)


class HeaderKey(APIKeyHeader):
    def __init__(self, header: str) -> None:
        self.param_name = header
        super().__init__()

    def authenticate(self, request: HttpRequest, key: str | None) -> bool | None:
        return admitted(request, key)


SUPERUSER = "superuser"
# What a staff session needs, by the API's area (the first match of the path): the Django
# permissions the console uses for the same pages, so one role means the same on both.
# Reads of /api/keys need `change_apikey`, as the console's "reveal": they answer with the
# keys in plaintext, and /api/settings likewise (the global proxy keys). An area not
# named here is for superusers.
AREAS = (
    ("/api/tasks", "keys.%s_apikey", "view"),
    ("/api/keys", "keys.%s_apikey", "change"),
    ("/api/groups", "keys.%s_group", "view"),
    ("/api/logs", "logs.%s_requestlog", "view"),
    ("/api/dashboard", "logs.%s_requestlog", "view"),
    ("/api/settings", "settings_app.%s_systemsetting", "change"),
    ("/api/access-keys", "access.%s_accesskey", "view"),  # no secret is ever read back
    ("/api/channel-types", "", ""),
)
ADDING = ("/add-multiple", "/add-async", "/copy")
DELETING = ("/delete-multiple", "/delete-async", "/clear-all", "/clear-all-invalid")


def required_permission(method: str, path: str) -> str:
    """The permission a staff user needs for `method path` ("" for none: any staff user)."""
    for prefix, permission, read in AREAS:
        if path == prefix or path.startswith(prefix + "/"):
            if not permission:
                return ""
            if method in ("GET", "HEAD", "OPTIONS"):
                action = read
            elif method == "DELETE" or path.rstrip("/").endswith(DELETING):
                action = "delete"
            elif path.rstrip("/").endswith(ADDING) or (method == "POST" and path == prefix):
                action = "add"
            else:
                action = "change"
            return permission % action
    return SUPERUSER


class StaffSession(SessionAuth):
    """A staff user logged in to the admin; unsafe methods need the CSRF token.

    CSRF guards a session, so it is checked only for a request that has one: a script
    with a wrong or missing AUTH_KEY gets 401, not a CSRF refusal it cannot act on.
    """

    def __call__(self, request: HttpRequest) -> Any:
        user = getattr(request, "user", None)
        if user is None or not (user.is_active and user.is_staff):
            return None
        if self.csrf and not getattr(request, "_ninja_csrf_exempt", False) and check_csrf(request):
            raise HttpError(403, _("CSRF check failed: send the csrftoken cookie's value as "
                            "X-CSRFToken, or authenticate with AUTH_KEY instead of the session."))  # fmt: skip
        needed = required_permission(request.method or "GET", request.path)
        allowed = (
            (not needed or user.has_perm(needed)) if needed != SUPERUSER else user.is_superuser
        )
        if not allowed:
            raise ApiError(403, "FORBIDDEN", _("Your account lacks the permission %(permission)s "
                           "for this; ask an administrator, or use AUTH_KEY.")
                           % {"permission": needed})  # fmt: skip
        return user

    def authenticate(self, request: HttpRequest, key: str | None) -> Any:
        return self(request)


class StrictParser(Parser):
    """Reads JSON bodies with pydantic's parser, and refuses a query parameter sent twice
    (`?page=1&page=2`) rather than guessing which one was meant (Django would take the
    last, GPT-Load's gin the first)."""

    def parse_body(self, request: HttpRequest) -> dict[str, Any]:
        # Unlike json.loads, it refuses escaped lone surrogates ("\ud800"): no database
        # can store them as UTF-8, so they failed at the INSERT. Nor NaN, which is no JSON.
        # A leading BOM, as some editors save JSON, is allowed.
        body = request.body.removeprefix(codecs.BOM_UTF8)
        return cast("dict[str, Any]", from_json(body, allow_inf_nan=False))

    def parse_querydict(
        self, data: MultiValueDict[str, Any], list_fields: list[str], request: HttpRequest
    ) -> dict[str, Any]:
        for name, values in data.lists():
            if len(values) > 1 and name not in list_fields:
                raise ApiError(400, "BAD_REQUEST", _("%(name)s: sent %(count)d times; "
                               "send each parameter once.")
                               % {"name": name, "count": len(values)})  # fmt: skip
        return super().parse_querydict(data, list_fields, request)


ADMIN_AUTH = [BearerKey(), HeaderKey("X-Api-Key"), HeaderKey("X-Goog-Api-Key"), StaffSession()]

ERROR_RESPONSE = {
    "description": "Refused: `code` names the reason, `message` says what to fix.",
    "content": {"application/json": {"schema": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
    }}},
}  # fmt: skip


class ManagementAPI(NinjaAPI):
    """Ninja's API, whose OpenAPI document also describes the refusals every operation
    may answer with (GPT-Load's error shape), so clients and fuzzers can rely on it."""

    def get_openapi_schema(
        self, *, path_prefix: str | None = None, path_params: dict[str, Any] | None = None
    ) -> Any:
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].setdefault("4XX", ERROR_RESPONSE)
        return schema


api = ManagementAPI(
    title="gptload management API",
    version="1",
    description="GPT-Load-compatible management API. Authenticate with AUTH_KEY as a Bearer "
    "token or X-Api-Key header, or with an admin session.",
    urls_namespace="api",
    auth=ADMIN_AUTH,
    docs_url="/docs",
    openapi_url="/openapi.json",
    parser=StrictParser(),
)


def error(request: HttpRequest, status: int, code: str, message: str) -> HttpResponse:
    return api.create_response(request, {"code": code, "message": message}, status=status)


@api.exception_handler(ApiError)
def on_api_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
    return error(request, exc.status, exc.code, exc.message)


@api.exception_handler(ValidationError)
def on_validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    problems = []
    for item in exc.errors:
        where = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "payload"))
        # pydantic's own words stay English: only our frame around them is translated.
        problem = item["msg"] if "msg" in item else _("invalid")
        problems.append(f"{where}: {problem}" if where else item.get("msg", ""))
    if any("Cannot parse request body" in p for p in problems):
        return error(request, 400, "INVALID_JSON", _("The request body is not valid JSON."))
    return error(request, 400, "VALIDATION_FAILED", "; ".join(problems) or _("Invalid request."))


@api.exception_handler(ModelValidationError)
def on_model_validation_error(request: HttpRequest, exc: ModelValidationError) -> HttpResponse:
    if hasattr(exc, "error_dict"):
        problems = [f"{field}: {' '.join(m for e in errors for m in e.messages)}"
                    for field, errors in exc.error_dict.items()]  # fmt: skip
    else:
        problems = list(exc.messages)
    return error(request, 400, "VALIDATION_FAILED", "; ".join(problems))


@api.exception_handler(AuthenticationError)
def on_unauthenticated(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return error(request, 401, "UNAUTHORIZED", _("Authentication failed: send AUTH_KEY as a "
                 "Bearer token or X-Api-Key header."))  # fmt: skip


@api.exception_handler(HttpError)
def on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    if str(exc).startswith("Cannot parse request body"):  # DEBUG adds the parser's words
        return error(request, 400, "INVALID_JSON", _("The request body is not valid JSON."))
    code = STATUS_CODES.get(exc.status_code, "BAD_REQUEST")
    return error(request, exc.status_code, code, str(exc))


@api.exception_handler(Http404)
def on_not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return error(request, 404, "NOT_FOUND", str(exc) or _("Not found."))


@csrf_exempt  # it changes nothing; else a POST there would get CSRF's HTML 403
def unknown_path(request: HttpRequest) -> HttpResponse:
    """`/api/…` paths with no endpoint: a JSON 404, not Django's HTML page."""
    return error(
        request, 404, "NOT_FOUND", _("No API endpoint at %(path)s") % {"path": request.path}
    )


@api.exception_handler(IntegrityError)
def on_integrity_error(request: HttpRequest, exc: IntegrityError) -> HttpResponse:
    return error(
        request, 409, "DUPLICATE_RESOURCE", _("A record with these values already exists.")
    )


@api.exception_handler(RequestDataTooBig)
def on_too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return error(request, 413, "PAYLOAD_TOO_LARGE", _("The request body exceeds %(limit)d bytes; "
                 "upload large key files as a multipart `file` to /api/keys/add-async.")
                 % {"limit": limit})  # fmt: skip


@api.exception_handler(MultiPartParserError)
def on_bad_multipart(request: HttpRequest, exc: MultiPartParserError) -> HttpResponse:
    return error(request, 400, "BAD_REQUEST", _("The multipart body cannot be read (%(error)s): "
                 "send multipart/form-data with its boundary, or a JSON body.")
                 % {"error": exc})  # fmt: skip


@api.exception_handler(SuspiciousOperation)
def on_suspicious(request: HttpRequest, exc: SuspiciousOperation) -> HttpResponse:
    return error(request, 400, "BAD_REQUEST", str(exc) or _("The request is malformed."))


@api.exception_handler(DataError)
def on_data_error(request: HttpRequest, exc: DataError) -> HttpResponse:
    # A value the schema let through but the database refuses (MySQL strict mode): the
    # client can fix it; logged because a schema should have caught it first.
    log.warning("database refused a value of %s %s: %s", request.method, request.path, exc)
    return error(request, 400, "VALIDATION_FAILED", _("A value is too long or out of range; "
                 "send shorter text or smaller numbers."))  # fmt: skip


@api.exception_handler(Exception)
def on_unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    log.exception("management API request %s %s failed", request.method, request.path)
    return error(request, 500, "INTERNAL_SERVER_ERROR", _("gptload failed to handle this request."))
