"""`/api/groups…`: GPT-Load's group endpoints (REFERENCE.md §5.2, §5.3), plus an on/off switch.

Validation is the model's (`Group.full_clean()`, `GroupSubGroup.full_clean()`), so the API,
the admin and any script refuse the same things with the same words. Inputs are strict:
unknown fields and wrong JSON types are refused rather than guessed at.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any, Literal

from django.db import transaction
from django.http import HttpRequest
from django.utils.translation import gettext as _
from ninja import Field, Router, Schema
from pydantic import ConfigDict

from gptload.lib.api import MAX_ID, MAX_INT, ApiError, Envelope, not_found, ok
from keys import groups
from keys.models import Group, GroupSubGroup
from keys.validation import canonical_header
from settings_app import registry
from settings_app.models import SystemSetting

router = Router(tags=["groups"])
STRICT = ConfigDict(extra="forbid", strict=True)
ChannelName = Literal["openai", "openai-response", "gemini", "anthropic"]


# Schemas ---------------------------------------------------------------------------------


class UpstreamIn(Schema):
    model_config = STRICT
    url: str = Field(max_length=2048)
    weight: int = Field(1, ge=0, le=MAX_INT)


class HeaderRuleIn(Schema):
    model_config = STRICT
    key: str = Field(max_length=256)
    value: str = ""
    action: Literal["set", "remove"] = "set"


class SubGroupIn(Schema):
    model_config = STRICT
    group_id: int = Field(ge=1, le=MAX_ID)
    weight: int = Field(ge=0, le=1000)


class GroupFields(Schema):
    """Every field a client may set; on update, only the fields sent change."""

    model_config = STRICT
    display_name: str | None = None
    description: str | None = None
    upstreams: list[UpstreamIn] | None = None
    validation_endpoint: str | None = None
    test_model: str | None = None
    param_overrides: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    header_rules: list[HeaderRuleIn] | None = None
    model_redirect_rules: dict[str, str] | None = None
    model_redirect_strict: bool | None = None
    proxy_keys: str | None = None
    sort: int | None = Field(None, ge=0, le=MAX_INT)
    enabled: bool | None = None


class GroupCreateIn(GroupFields):
    name: str
    channel_type: ChannelName
    group_type: Literal["standard", "aggregate"] = "standard"
    sub_groups: list[SubGroupIn] | None = None


class GroupUpdateIn(GroupFields):
    name: str | None = None
    channel_type: ChannelName | None = None
    group_type: Literal["standard", "aggregate"] | None = None


class GroupOut(Schema):
    id: int
    name: str
    endpoint: str
    display_name: str
    description: str
    group_type: str
    channel_type: str
    upstreams: list[dict[str, Any]]
    validation_endpoint: str
    test_model: str
    param_overrides: dict[str, Any]
    config: dict[str, Any]
    header_rules: list[dict[str, Any]]
    model_redirect_rules: dict[str, str]
    model_redirect_strict: bool
    proxy_keys: str
    enabled: bool
    sort: int
    last_validated_at: datetime | None
    created_at: datetime
    updated_at: datetime


class GroupBriefOut(Schema):
    id: int
    name: str
    display_name: str


class ConfigOptionOut(Schema):
    key: str
    name: str
    description: str
    default_value: Any


class ReorderItem(Schema):
    model_config = STRICT
    id: int = Field(ge=1, le=MAX_ID)
    sort: int = Field(ge=0, le=MAX_INT)


class ReorderIn(Schema):
    model_config = STRICT
    items: list[ReorderItem] = Field(min_length=1, max_length=groups.BATCH)


class DeletedOut(Schema):
    id: int
    name: str
    deleted_keys: int


class KeyStatsOut(Schema):
    total_keys: int
    active_keys: int
    invalid_keys: int
    cooling_keys: int
    disabled_keys: int


class CopyIn(Schema):
    model_config = STRICT
    copy_keys: Literal["none", "valid_only", "all"] = "all"


class CopyOut(Schema):
    group: GroupOut


class SubGroupsIn(Schema):
    model_config = STRICT
    sub_groups: list[SubGroupIn] = Field(min_length=1, max_length=groups.BATCH)


class WeightIn(Schema):
    model_config = STRICT
    weight: int = Field(ge=0, le=1000)


class MemberOut(KeyStatsOut):
    group: GroupOut
    weight: int


class ParentOut(Schema):
    group_id: int
    name: str
    display_name: str
    weight: int


class EnabledIn(Schema):
    model_config = STRICT
    enabled: bool


# Helpers ---------------------------------------------------------------------------------


def app_url() -> str:
    return str(SystemSetting.objects.effective()["app_url"])


def group_out(group: Group, base_url: str) -> dict[str, Any]:
    fields = {name: getattr(group, name) for name in GroupOut.model_fields if name != "endpoint"}
    return {**fields, "id": group.pk, "endpoint": groups.endpoint(base_url, group.name)}


def get_group(group_id: int) -> Group:
    group = Group.objects.filter(pk=group_id).first()
    if group is None:
        raise not_found(_("group %(id)s not found") % {"id": group_id})
    return group


def apply_fields(group: Group, payload: GroupFields) -> None:
    """Copies the fields the client sent onto `group`, trimmed and normalised."""
    sent = {
        name: getattr(payload, name)
        for name in payload.model_fields_set - {"sub_groups"}
        if getattr(payload, name) is not None
    }
    requested_type = sent.pop("group_type", group.group_type)
    if group.pk and requested_type != group.group_type:
        raise ApiError(400, "VALIDATION_FAILED", _("group_type: a group's type cannot change; "
                       "create a new group of the other type instead."))  # fmt: skip
    group.group_type = requested_type
    if not str(sent.get("test_model", "x")).strip():
        sent.pop("test_model")  # GPT-Load: an empty test model on update means "unchanged"
    for name, value in sent.items():
        setattr(group, name, value.strip() if isinstance(value, str) else value)
    if "upstreams" in sent:
        group.upstreams = [{"url": u.url.strip(), "weight": u.weight} for u in sent["upstreams"]]
    if "header_rules" in sent:
        group.header_rules = [
            {"key": canonical_header(r.key.strip()), "value": r.value, "action": r.action}
            for r in sent["header_rules"]
        ]


def save_group(group: Group) -> None:
    """Validates through the model and saves; a taken name is a 409 that names it."""
    if Group.objects.filter(name=group.name).exclude(pk=group.pk).exists():
        raise ApiError(409, "DUPLICATE_RESOURCE", _("A group named %(name)s already exists; "
                       "choose another name.") % {"name": repr(group.name)})  # fmt: skip
    group.full_clean()
    group.save()


def members_out(aggregate: Group) -> list[dict[str, Any]]:
    rows = list(
        aggregate.members.select_related("sub_group").order_by("sub_group__sort", "sub_group_id")
    )
    counts = groups.key_counts(row.sub_group_id for row in rows)
    base_url = app_url()
    return [
        {"group": group_out(row.sub_group, base_url), "weight": row.weight,
         **asdict(counts[row.sub_group_id])}
        for row in rows
    ]  # fmt: skip


# Endpoints -------------------------------------------------------------------------------


@router.post("", response=Envelope[GroupOut])
def create_group(request: HttpRequest, payload: GroupCreateIn) -> dict[str, Any]:
    """Creates a standard group, or an aggregate group (optionally with its `sub_groups`)."""
    group = Group(name=payload.name.strip(), channel_type=payload.channel_type)
    apply_fields(group, payload)
    if payload.sub_groups and not group.is_aggregate:
        raise ApiError(400, "VALIDATION_FAILED", _("sub_groups: only an aggregate group has "
                       'members; send "group_type": "aggregate".'))  # fmt: skip
    with transaction.atomic():
        save_group(group)
        if payload.sub_groups:
            groups.add_members(group, [(m.group_id, m.weight) for m in payload.sub_groups])
    return ok(group_out(group, app_url()))


@router.get("", response=Envelope[list[GroupOut]])
def list_groups(request: HttpRequest) -> dict[str, Any]:
    """Every group, in list order (`sort`, then newest first), with proxy keys and endpoint."""
    base_url = app_url()
    return ok([group_out(group, base_url) for group in Group.objects.all()])


@router.get("/list", response=Envelope[list[GroupBriefOut]])
def list_group_names(request: HttpRequest) -> dict[str, Any]:
    """`id`, `name` and `display_name` of every group, for selectors."""
    return ok(list(Group.objects.values("id", "name", "display_name")))


@router.get("/config-options", response=Envelope[list[ConfigOptionOut]])
def config_options(request: HttpRequest) -> dict[str, Any]:
    """The settings a group may override in `config`; `default_value` is the system value."""
    system = SystemSetting.objects.effective()
    options = [
        {
            "key": s.key,
            "name": _(s.name),
            "description": _(s.description),
            "default_value": system[s.key],
        }
        for s in registry.SETTINGS
        if s.group_overridable
    ]
    return ok(options)


@router.put("/reorder", response=Envelope[list[GroupBriefOut]])
def reorder_groups(request: HttpRequest, payload: ReorderIn) -> dict[str, Any]:
    """Sets the list position (`sort`) of several groups at once, all or none."""
    groups.reorder([(item.id, item.sort) for item in payload.items])
    return ok(list(Group.objects.values("id", "name", "display_name")))


@router.get("/{group_id}", response=Envelope[GroupOut])
def get_one_group(request: HttpRequest, group_id: int) -> dict[str, Any]:
    """One group, as in the list."""
    return ok(group_out(get_group(group_id), app_url()))


@router.put("/{group_id}", response=Envelope[GroupOut])
def update_group(request: HttpRequest, group_id: int, payload: GroupUpdateIn) -> dict[str, Any]:
    """Changes the fields sent and no other; `upstreams` and `header_rules` are replaced
    whole, and an empty `test_model` leaves it as it is (as in GPT-Load)."""
    group = get_group(group_id)
    apply_fields(group, payload)
    with transaction.atomic():
        save_group(group)
    return ok(group_out(group, app_url()))


@router.delete("/{group_id}", response=Envelope[DeletedOut])
def delete_group(request: HttpRequest, group_id: int) -> dict[str, Any]:
    """Deletes a group with its keys and its aggregate memberships. Its request logs and
    hourly statistics stay (they name the group, they do not point to it)."""
    group = get_group(group_id)
    name = group.name
    deleted = groups.delete_group(group)
    return ok({"id": group_id, "name": name, "deleted_keys": deleted})


@router.post("/{group_id}/copy", response=Envelope[CopyOut])
def copy_group(request: HttpRequest, group_id: int, payload: CopyIn) -> dict[str, Any]:
    """Copies a group as `{name}_copy` (then `_copy_2`…) with display name + " Copy".
    `copy_keys`: `all` (default), `valid_only` (active and cooling keys) or `none`; copied
    keys keep their status. An aggregate's copy gets the same members."""
    copy = groups.copy_group(get_group(group_id), payload.copy_keys)
    return ok({"group": group_out(copy, app_url())})


@router.get("/{group_id}/sub-groups", response=Envelope[list[MemberOut]])
def list_sub_groups(request: HttpRequest, group_id: int) -> dict[str, Any]:
    """An aggregate's members with their weight and key counts."""
    aggregate = get_group(group_id)
    if not aggregate.is_aggregate:
        raise groups.not_aggregate(aggregate)
    return ok(members_out(aggregate))


@router.post("/{group_id}/sub-groups", response=Envelope[list[MemberOut]])
def add_sub_groups(request: HttpRequest, group_id: int, payload: SubGroupsIn) -> dict[str, Any]:
    """Adds standard groups of the aggregate's channel type as members, all or none."""
    aggregate = get_group(group_id)
    groups.add_members(aggregate, [(m.group_id, m.weight) for m in payload.sub_groups])
    return ok(members_out(aggregate))


@router.put("/{group_id}/sub-groups/{sub_group_id}/weight", response=Envelope[list[MemberOut]])
def set_sub_group_weight(
    request: HttpRequest, group_id: int, sub_group_id: int, payload: WeightIn
) -> dict[str, Any]:
    """Sets a member's routing weight (0-1000; 0 keeps it but routes nothing to it)."""
    aggregate = get_group(group_id)
    member = groups.membership(aggregate, sub_group_id)
    member.weight = payload.weight
    member.full_clean()
    member.save()
    return ok(members_out(aggregate))


@router.delete("/{group_id}/sub-groups/{sub_group_id}", response=Envelope[list[MemberOut]])
def remove_sub_group(request: HttpRequest, group_id: int, sub_group_id: int) -> dict[str, Any]:
    """Removes a member from an aggregate (the member group itself stays)."""
    aggregate = get_group(group_id)
    groups.membership(aggregate, sub_group_id).delete()
    return ok(members_out(aggregate))


@router.get("/{group_id}/parent-aggregate-groups", response=Envelope[list[ParentOut]])
def parent_aggregate_groups(request: HttpRequest, group_id: int) -> dict[str, Any]:
    """The aggregate groups this group is a member of, with its weight in each."""
    group = get_group(group_id)
    rows = GroupSubGroup.objects.filter(sub_group=group).select_related("group")
    return ok([
        {"group_id": row.group_id, "name": row.group.name,
         "display_name": row.group.display_name, "weight": row.weight}
        for row in rows.order_by("group__sort", "group_id")
    ])  # fmt: skip


@router.put("/{group_id}/enabled", response=Envelope[GroupOut])
def set_enabled(request: HttpRequest, group_id: int, payload: EnabledIn) -> dict[str, Any]:
    """Switches a group on or off; the proxy answers 403 for a group that is off."""
    group = get_group(group_id)
    group.enabled = payload.enabled
    group.save(update_fields=["enabled", "updated_at"])
    return ok(group_out(group, app_url()))
