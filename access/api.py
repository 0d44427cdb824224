"""`/api/access-keys…`: clients' access keys, in the management API's envelope.

A key's secret appears in two answers only, the create call's and the rotate call's,
and never again: the database holds its hash (never returned) and a masked hint. Its
usage (`/api/access-keys/{id}/usage`) is read from the request log's rollups, so it is
served by `logs.api_usage`.

Validation is the model's (`AccessKey.full_clean()`), so the API and the console refuse
the same things with the same words. Inputs are strict: unknown fields and wrong JSON
types are refused rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any

from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext as _
from ninja import Field, Query, Router, Schema
from pydantic import ConfigDict, StringConstraints, field_validator

from access.models import MAX_PATTERN_LENGTH, MAX_PATTERNS, AccessKey
from gptload.lib.api import (
    MAX_ID,
    MAX_INT,
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
from gptload.lib.paging import Keyset
from keys.models import Group

router = Router(tags=["access keys"])
STRICT = ConfigDict(extra="forbid", strict=True)
KEY_ORDER = Keyset("created_at")  # newest first
MAX_GROUPS = 1000
GroupId = Annotated[int, Field(ge=1, le=MAX_ID)]
Pattern = Annotated[str, StringConstraints(max_length=MAX_PATTERN_LENGTH)]


# Schemas ---------------------------------------------------------------------------------


class AccessKeyFields(Schema):
    """Every field a client may set; on update, only the fields sent change."""

    model_config = STRICT
    group_ids: list[GroupId] | None = Field(
        None, max_length=MAX_GROUPS, description="Groups it may call; empty: every group."
    )
    models: list[Pattern] | None = Field(
        None,
        max_length=MAX_PATTERNS,
        description="Glob patterns of the models it may ask for (`gpt-4o*`); empty: every model.",
    )
    rpm: int | None = Field(None, ge=0, le=MAX_INT, description="Requests per minute; 0: no limit.")
    tpm: int | None = Field(None, ge=0, le=MAX_INT, description="Tokens per minute; 0: no limit.")
    daily_tokens: int | None = Field(None, ge=0, le=MAX_ID, description="0: no limit.")
    monthly_tokens: int | None = Field(None, ge=0, le=MAX_ID, description="0: no limit.")
    max_concurrency: int | None = Field(
        None, ge=0, le=MAX_INT, description="Calls in flight at once; 0: no limit."
    )
    # Lax: JSON has no time type, so a time comes as text (ISO 8601); without an offset
    # it is read in the server's TZ.
    expires_at: datetime | None = Field(
        None, strict=False, description="ISO 8601; null: never expires."
    )
    enabled: bool | None = None
    notes: str | None = Field(None, max_length=10_000)


class AccessKeyCreateIn(AccessKeyFields):
    name: str = Field(max_length=100)


class AccessKeyUpdateIn(AccessKeyFields):
    name: str | None = Field(None, max_length=100)


class AccessKeyOut(Schema):
    id: int
    name: str
    key_hint: str = Field(description="The secret, masked.")
    group_ids: list[int]
    models: list[str]
    rpm: int
    tpm: int
    daily_tokens: int
    monthly_tokens: int
    max_concurrency: int
    expires_at: datetime | None
    expired: bool
    enabled: bool
    notes: str
    created_at: datetime
    updated_at: datetime


class IssuedOut(AccessKeyOut):
    key: str = Field(description="The secret: shown in this answer only, never again.")


class DeletedOut(Schema):
    id: int
    name: str


class AccessKeyFilters(Schema):
    """An empty parameter (`?enabled=`) means no filter."""

    name: str | None = Field(None, max_length=100, description="Substring, case-insensitive.")
    enabled: bool | None = Field(None, json_schema_extra=blank_allowed)
    group_id: int | None = Field(
        None, ge=1, le=MAX_ID, description="Keys that may call this group by name (not "
        "those allowed every group).", json_schema_extra=blank_allowed,
    )  # fmt: skip

    @field_validator("*", mode="before")
    @classmethod
    def blank_is_absent(cls, value: Any) -> Any:
        return None if is_blank(value) else value


# Helpers ---------------------------------------------------------------------------------


def access_key_out(keys: Iterable[AccessKey]) -> list[dict[str, Any]]:
    """Keys as the API shows them (no hash), their group ids read in one query."""
    keys = list(keys)
    links: dict[int, list[int]] = {key.pk: [] for key in keys}
    through = AccessKey.groups.through.objects.filter(accesskey_id__in=list(links))
    for key_id, group_id in through.order_by("group_id").values_list("accesskey_id", "group_id"):
        links[key_id].append(group_id)
    now = timezone.now()
    return [
        {**{name: getattr(key, name) for name in AccessKeyOut.model_fields
            if name not in ("group_ids", "expired")},
         "group_ids": links[key.pk], "expired": key.expired(now)}
        for key in keys
    ]  # fmt: skip


def one_out(key: AccessKey, secret: str | None = None) -> dict[str, Any]:
    (shown,) = access_key_out([key])
    return shown if secret is None else {**shown, "key": secret}


def get_access_key(access_key_id: int) -> AccessKey:
    key = AccessKey.objects.filter(pk=access_key_id).first()
    if key is None:
        raise not_found(_("access key %(id)s not found") % {"id": access_key_id})
    return key


def groups_of(ids: list[int]) -> list[int]:
    """`ids` without repeats, after checking that each names a group (aggregates too)."""
    wanted = list(dict.fromkeys(ids))
    found = set(Group.objects.filter(pk__in=wanted).values_list("pk", flat=True))
    if missing := [str(i) for i in wanted if i not in found]:
        raise ApiError(400, "VALIDATION_FAILED", _("group_ids: no group with id %(ids)s; see "
                       "GET /api/groups/list.") % {"ids": ", ".join(missing)})  # fmt: skip
    return wanted


def apply_fields(key: AccessKey, payload: AccessKeyFields) -> list[int] | None:
    """Copies the fields the client sent onto `key`; returns the new group ids, if sent.

    A null leaves a field as it is, except `expires_at`, where null means never (a time
    without an offset is read in the server's TZ by the model).
    """
    sent = payload.model_fields_set
    for name in sent - {"group_ids"}:
        value = getattr(payload, name)
        if value is not None or name == "expires_at":
            setattr(key, name, value)
    if "group_ids" in sent and payload.group_ids is not None:
        return groups_of(payload.group_ids)
    return None


def save(key: AccessKey, group_ids: list[int] | None) -> None:
    """Validates through the model and saves the key and its groups, all or nothing."""
    key.full_clean()
    with transaction.atomic():
        key.save()
        if group_ids is not None:
            key.groups.set(group_ids)


def filtered(filters: AccessKeyFilters) -> QuerySet[AccessKey]:
    rows = AccessKey.objects.all()
    if filters.name:
        rows = rows.filter(name__icontains=filters.name.strip())
    if filters.enabled is not None:
        rows = rows.filter(enabled=filters.enabled)
    if filters.group_id is not None:
        rows = rows.filter(groups=filters.group_id)
    return rows


# Endpoints -------------------------------------------------------------------------------


@router.get("", response=Envelope[Page[AccessKeyOut]])
def list_access_keys(
    request: HttpRequest, filters: Query[AccessKeyFilters], pages: Query[PageQuery]
) -> dict[str, Any]:
    """Access keys, newest first, paged by `page` or by `next_cursor`. Secrets are never
    shown, only their masked hint."""
    return ok(paginate(filtered(filters), pages, KEY_ORDER, access_key_out))


@router.post("", response=Envelope[IssuedOut])
def create_access_key(request: HttpRequest, payload: AccessKeyCreateIn) -> dict[str, Any]:
    """Makes an access key and returns its secret as `key`: store it now, it is never
    shown again (only its hash is kept)."""
    key = AccessKey(name=payload.name)
    group_ids = apply_fields(key, payload)
    secret = key.issue()
    save(key, group_ids)
    return ok(one_out(key, secret))


@router.get("/{access_key_id}", response=Envelope[AccessKeyOut])
def get_one_access_key(request: HttpRequest, access_key_id: int) -> dict[str, Any]:
    """One access key, as in the list."""
    return ok(one_out(get_access_key(access_key_id)))


@router.put("/{access_key_id}", response=Envelope[AccessKeyOut])
def update_access_key(
    request: HttpRequest, access_key_id: int, payload: AccessKeyUpdateIn
) -> dict[str, Any]:
    """Changes the fields sent and no other; `group_ids` and `models` are replaced whole.
    The secret cannot be set: `POST /api/access-keys/{id}/rotate` makes a new one."""
    key = get_access_key(access_key_id)
    group_ids = apply_fields(key, payload)
    save(key, group_ids)
    return ok(one_out(key))


@router.post("/{access_key_id}/rotate", response=Envelope[IssuedOut])
def rotate_access_key(request: HttpRequest, access_key_id: int) -> dict[str, Any]:
    """Replaces the key's secret with a new one, returned as `key` in this answer only;
    the old secret stops working at once on every node."""
    key = get_access_key(access_key_id)
    secret = key.issue()
    key.save(update_fields=["key_hash", "key_hint", "updated_at"])
    return ok(one_out(key, secret))


@router.delete("/{access_key_id}", response=Envelope[DeletedOut])
def delete_access_key(request: HttpRequest, access_key_id: int) -> dict[str, Any]:
    """Deletes an access key; its request logs and usage statistics stay (they name it by
    id)."""
    key = get_access_key(access_key_id)
    name = key.name
    key.delete()
    return ok({"id": access_key_id, "name": name})
