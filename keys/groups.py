"""Operations on whole groups that the management API (and the admin) call: copy, delete,
reorder, aggregate membership and statistics.

Each function does its database work in as few statements as the data allows, keeps IN
lists at ≤ 1000 values (MySQL's placeholder limit, SQLite's variable limit) and moves the
configuration version once per change so that proxy processes reload.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.translation import gettext as _

from gptload.lib.api import ApiError
from keys.models import APIKey, Group, GroupSubGroup, KeyStatus, KeyTally
from settings_app.changes import group_changed

BATCH = 1000
MAX_COPY_SUFFIX = 1000
NAME_LIMIT = 100  # validation.GROUP_NAME allows 1-100 characters
COPY_KEYS_CHOICES = ("none", "valid_only", "all")
# Cooling keys are good keys that hit a rate limit; "valid" keeps them, as an operator means.
VALID_STATUSES = (KeyStatus.ACTIVE, KeyStatus.COOLING)


class GroupOperationError(ApiError):
    """A refused group operation; `status` is the HTTP status the API answers with."""


def endpoint(app_url: str, name: str) -> str:
    """The URL clients call for a group: `{app_url}/proxy/{name}`."""
    return f"{app_url.rstrip('/')}/proxy/{name}"


# Copy ------------------------------------------------------------------------------------


def copy_name(name: str) -> str:
    """`{name}_copy`, else `{name}_copy_2` … `_copy_1000`, the first one not taken.

    The base is shortened when needed so that the result is still a valid group name.
    Raises `GroupOperationError` (409) when every candidate is taken.
    """
    suffixes = ["_copy"] + [f"_copy_{n}" for n in range(2, MAX_COPY_SUFFIX + 1)]
    candidates = [name[: NAME_LIMIT - len(suffix)] + suffix for suffix in suffixes]
    taken = set(Group.objects.filter(name__in=candidates).values_list("name", flat=True))
    for candidate in candidates:
        if candidate not in taken:
            return candidate
    raise GroupOperationError(
        409,
        "DUPLICATE_RESOURCE",
        _("%(name)s_copy … %(name)s_copy_%(max)d all exist.")
        % {"name": name, "max": MAX_COPY_SUFFIX},
    )


def copy_group(source: Group, copy_keys: str = "all") -> Group:
    """A new group with `source`'s settings, members (for an aggregate) and chosen keys.

    `copy_keys`: "none", "valid_only" (active and cooling keys) or "all". Keys keep their
    status and notes; their counters start at zero, since they describe use in a group.
    Ciphertexts and hashes are copied as stored, so no key is decrypted on the way.
    """
    if copy_keys not in COPY_KEYS_CHOICES:
        raise GroupOperationError(
            400, "VALIDATION_FAILED", _("copy_keys must be 'none', 'valid_only' or 'all'.")
        )
    with transaction.atomic():
        copy = Group.objects.get(pk=source.pk)
        copy.pk = None
        copy.name = copy_name(source.name)
        copy.display_name = f"{source.display_name} Copy" if source.display_name else ""
        copy.last_validated_at = None
        copy.save(force_insert=True)
        GroupSubGroup.objects.bulk_create(
            GroupSubGroup(group=copy, sub_group_id=m.sub_group_id, weight=m.weight)
            for m in source.members.all()
        )
        if copy_keys != "none" and not source.is_aggregate:
            keys = APIKey.objects.filter(group=source)
            if copy_keys == "valid_only":
                keys = keys.filter(status__in=VALID_STATUSES)
            _copy_keys(keys, copy)
        group_changed(copy.pk)  # bulk writes send no model signals
    return copy


KEY_COPY_FIELDS = (
    "key_value",
    "key_hash",
    "status",
    "cooling_until",
    "status_changed_at",
    "last_error",
    "notes",
)


def _copy_keys(keys: QuerySet[APIKey], target: Group) -> None:
    # Keyset pages rather than one streaming cursor: memory stays flat on every backend
    # (mysqlclient buffers a whole result set) and no read is open while we insert.
    last_id = 0
    while True:
        page = list(
            keys.filter(id__gt=last_id).order_by("id").values_list("id", *KEY_COPY_FIELDS)[:BATCH]
        )
        if not page:
            return
        APIKey.objects.bulk_create(
            APIKey(group=target, **dict(zip(KEY_COPY_FIELDS, row[1:], strict=True))) for row in page
        )
        last_id = page[-1][0]


# Delete ----------------------------------------------------------------------------------


def delete_group(group: Group) -> int:
    """Deletes a group, its keys and its memberships on both sides; returns keys deleted.

    Keys go first, 1000 at a time in short transactions of their own, so that a group of
    100k keys neither builds a giant IN list nor holds the write lock for long (SQLite has
    one writer). The group row and memberships then go in one transaction, whose delete
    signal moves the configuration version once for the whole operation.
    """
    deleted = 0
    while True:
        with transaction.atomic():
            ids = list(APIKey.objects.filter(group=group).values_list("id", flat=True)[:BATCH])
            if not ids:
                break
            # remove(): one DELETE and no per-row signals; through Model.delete() each
            # row would be loaded and would queue a version bump of its own.
            deleted += APIKey.objects.filter(id__in=ids).remove()
    with transaction.atomic():
        group.delete()
    return deleted


# Reorder ---------------------------------------------------------------------------------


def reorder(items: Sequence[tuple[int, int]]) -> None:
    """Sets `sort` for each `(group id, sort)` in one transaction, the rows locked.

    Raises `GroupOperationError` for an empty list, a repeated id, a negative sort or an
    unknown group, and then changes nothing.
    """
    if not items:
        raise GroupOperationError(400, "VALIDATION_FAILED", _("items: give at least one group."))
    if len(items) > BATCH:
        raise GroupOperationError(
            400,
            "VALIDATION_FAILED",
            _("items: reorder at most %(max)d groups at once.") % {"max": BATCH},
        )
    seen: set[int] = set()
    for group_id, sort in items:
        if group_id in seen:
            raise GroupOperationError(
                400,
                "VALIDATION_FAILED",
                _("items: group %(id)s is listed twice.") % {"id": group_id},
            )
        if sort < 0:
            raise GroupOperationError(
                400,
                "VALIDATION_FAILED",
                _("items: sort of group %(id)s must be ≥ 0.") % {"id": group_id},
            )
        seen.add(group_id)
    with transaction.atomic():
        found = set(
            Group.objects.select_for_update().filter(id__in=seen).values_list("id", flat=True)
        )
        missing = sorted(seen - found)
        if missing:
            message = _("group %(id)s not found") % {"id": missing[0]}
            raise GroupOperationError(404, "NOT_FOUND", message)
        for group_id, sort in items:
            Group.objects.filter(id=group_id).update(sort=sort, updated_at=timezone.now())
            group_changed(group_id)


# Aggregate members -----------------------------------------------------------------------


def add_members(aggregate: Group, members: Sequence[tuple[int, int]]) -> None:
    """Adds `(group id, weight)` members to an aggregate, all or none.

    Each member is checked by `GroupSubGroup.full_clean()` (standard group, same channel,
    same validation endpoint, not itself, weight 0-1000). Raises `GroupOperationError`
    for a non-aggregate, a repeated or unknown id, an existing member or a member the
    model refuses.
    """
    if not aggregate.is_aggregate:
        raise not_aggregate(aggregate)
    if not members:
        raise GroupOperationError(
            400, "VALIDATION_FAILED", _("sub_groups: give at least one group.")
        )
    if len(members) > BATCH:
        raise GroupOperationError(
            400,
            "VALIDATION_FAILED",
            _("sub_groups: add at most %(max)d groups at once.") % {"max": BATCH},
        )
    ids = [group_id for group_id, _weight in members]
    repeated = [group_id for group_id, n in Counter(ids).items() if n > 1]
    if repeated:
        raise GroupOperationError(
            400,
            "VALIDATION_FAILED",
            _("sub_groups: group %(id)s is listed twice.") % {"id": repeated[0]},
        )
    groups = Group.objects.in_bulk(ids)
    with transaction.atomic():
        existing = set(aggregate.members.values_list("sub_group_id", flat=True))
        for group_id, weight in members:
            if group_id not in groups:
                message = _("group %(id)s not found") % {"id": group_id}
                raise GroupOperationError(404, "NOT_FOUND", message)
            if group_id in existing:
                raise GroupOperationError(
                    409,
                    "DUPLICATE_RESOURCE",
                    _("group %(member)s is already a member of %(aggregate)s.")
                    % {"member": repr(groups[group_id].name), "aggregate": repr(aggregate.name)},
                )
            member = GroupSubGroup(group=aggregate, sub_group=groups[group_id], weight=weight)
            try:
                member.full_clean()
            except ValidationError as exc:
                raise GroupOperationError(
                    400,
                    "VALIDATION_FAILED",
                    _("sub_groups: group %(name)s: %(problems)s")
                    % {"name": repr(groups[group_id].name), "problems": " ".join(exc.messages)},
                ) from None
            member.save()


def membership(aggregate: Group, sub_group_id: int) -> GroupSubGroup:
    """The member row of `sub_group_id` in `aggregate`; raises `GroupOperationError` (404)."""
    if not aggregate.is_aggregate:
        raise not_aggregate(aggregate)
    found = aggregate.members.select_related("sub_group").filter(sub_group_id=sub_group_id).first()
    if found is None:
        raise GroupOperationError(
            404,
            "NOT_FOUND",
            _("group %(id)s is not a member of aggregate group %(aggregate)s")
            % {"id": sub_group_id, "aggregate": repr(aggregate.name)},
        )
    return found


def not_aggregate(group: Group) -> GroupOperationError:
    message = _("group %(name)s is a standard group; only aggregate groups have members.") % {
        "name": repr(group.name)
    }
    return GroupOperationError(400, "BAD_REQUEST", message)


# Statistics ------------------------------------------------------------------------------


@dataclass
class KeyCounts:
    total_keys: int = 0
    active_keys: int = 0
    invalid_keys: int = 0
    cooling_keys: int = 0
    disabled_keys: int = 0

    def add(self, status: str, count: int) -> None:
        self.total_keys += count
        field = f"{status}_keys"
        if hasattr(self, field):
            setattr(self, field, getattr(self, field) + count)

    def merge(self, other: KeyCounts) -> None:
        for field, count in asdict(other).items():
            setattr(self, field, getattr(self, field) + count)


def key_counts(group_ids: Iterable[int]) -> dict[int, KeyCounts]:
    """Keys per status for each group, from the tally (a few rows per group)."""
    ids = list(dict.fromkeys(group_ids))
    counts = {group_id: KeyCounts() for group_id in ids}
    for start in range(0, len(ids), BATCH):
        tallies = KeyTally.objects.by_group(ids[start : start + BATCH])
        for group_id, by_status in tallies.items():
            for status, n in by_status.items():
                counts[group_id].add(status, n)
    return counts
