"""Groups, aggregate members and keys read from a GPT-Load 1.x database, stored here.

`manage.py import_gptload` reads the rows (`gptload.lib.gptload_db`) and hands them over
a batch at a time; these functions turn them into ours and store them, or with
`dry_run` only count what they would store. Everything is matched, so a second run adds
nothing: a group by its name, a membership by its two groups, a key by its hash within
its group. A group is planned (converted and validated) before anything is stored, so a
row our rules refuse stops the import before its first write.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ValidationError

from gptload.lib import gptload_db as db
from gptload.lib.crypto import Cipher, DecryptionError, current_cipher
from keys.models import AGGREGATE_TEST_MODEL, APIKey, ChannelType, Group, GroupSubGroup, KeyStatus
from settings_app import registry
from settings_app.changes import group_changed

GROUP_COLUMNS = ("id", "name", "display_name", "description", "group_type", "channel_type",
                 "upstreams", "validation_endpoint", "test_model", "param_overrides", "config",
                 "header_rules", "model_redirect_rules", "model_redirect_strict", "proxy_keys",
                 "sort", "last_validated_at")  # fmt: skip
MEMBER_COLUMNS = ("id", "group_id", "sub_group_id", "weight")
KEY_COLUMNS = ("id", "key_value", "key_hash", "group_id", "status", "notes", "request_count",
               "failure_count", "last_used_at")  # fmt: skip
# Our fields that an import sets, and compares on a second run (`enabled` stays ours, and
# `last_validated_at` is taken only for a new group: our checker moves it afterwards).
GROUP_FIELDS = tuple(c for c in GROUP_COLUMNS[1:] if c != "last_validated_at")
STATUSES = {"active": KeyStatus.ACTIVE, "invalid": KeyStatus.INVALID}
PROBLEMS_SHOWN = 3
MAX_WEIGHT = 1000


class ImportRefused(ValueError):
    """A row our rules refuse (nothing was stored); the message names it and says why."""


@dataclass
class Tally:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0  # rows naming a group that no longer exists

    def __iadd__(self, other: Tally) -> Tally:
        self.created += other.created
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.skipped += other.skipped
        return self


# Groups ----------------------------------------------------------------------------------


@dataclass
class GroupPlan:
    """One GPT-Load group: ours as it will be stored, and whether that changes anything."""

    source_id: int
    group: Group  # unsaved when new; the stored one with the imported values otherwise
    new: bool
    changed: bool


@dataclass
class GroupsPlan:
    groups: list[GroupPlan]
    warnings: list[str] = field(default_factory=list)

    def by_source_id(self) -> dict[int, GroupPlan]:
        return {plan.source_id: plan for plan in self.groups}


def plan_groups(rows: Iterable[Mapping[str, Any]]) -> GroupsPlan:
    """Our groups for GPT-Load's, validated by our rules; raises `ImportRefused` naming
    the first few groups they refuse. Config overrides our registry refuses are dropped
    with a warning (the group still works, on the system value)."""
    plans: list[GroupPlan] = []
    warnings: list[str] = []
    problems: list[str] = []
    for row in rows:
        fields = group_fields(row, warnings)
        stored = Group.objects.filter(name=fields["name"]).first()
        group = stored or Group()
        before = {name: getattr(group, name) for name in GROUP_FIELDS} if stored else {}
        for name, value in fields.items():
            if stored is None or name != "last_validated_at":
                setattr(group, name, value)
        try:
            group.full_clean(exclude=["enabled"])
        except ValidationError as exc:
            problems.append(f"group {fields['name']!r}: {_first_error(exc)}")
            continue
        after = {name: getattr(group, name) for name in GROUP_FIELDS}
        plans.append(GroupPlan(int(row["id"]), group, stored is None, before != after))
    if problems:
        raise ImportRefused(_some(problems, "group"))
    return GroupsPlan(plans, warnings)


def group_fields(row: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    """Our field values for one GPT-Load `groups` row (raw column values)."""
    name = db.text_value(row["name"])
    aggregate = db.text_value(row.get("group_type")) == "aggregate"
    channel = db.text_value(row.get("channel_type"))
    if channel not in ChannelType.values:
        raise ImportRefused(
            f"group {name!r}: channel type {channel!r} is not one of "
            f"{', '.join(ChannelType.values)}"
        )
    return {
        "name": name,
        "display_name": db.text_value(row.get("display_name")),
        "description": db.text_value(row.get("description")),
        "group_type": "aggregate" if aggregate else "standard",
        "channel_type": channel,
        "upstreams": [] if aggregate else db.json_value(row.get("upstreams"), []),
        "validation_endpoint": db.text_value(row.get("validation_endpoint")),
        "test_model": AGGREGATE_TEST_MODEL if aggregate else db.text_value(row.get("test_model")),
        "param_overrides": db.json_value(row.get("param_overrides"), {}),
        "config": _config(name, db.json_value(row.get("config"), {}), warnings),
        "header_rules": db.json_value(row.get("header_rules"), []),
        "model_redirect_rules": db.json_value(row.get("model_redirect_rules"), {}),
        "model_redirect_strict": db.bool_value(row.get("model_redirect_strict")),
        "proxy_keys": db.text_value(row.get("proxy_keys")),
        "sort": db.int_value(row.get("sort")),
        "last_validated_at": db.time_value(row.get("last_validated_at")),
    }


def _config(name: str, config: Any, warnings: list[str]) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        warnings.append(f"group {name!r}: its config is not an object and was left out")
        return {}
    kept: dict[str, Any] = {}
    for key, value in config.items():
        try:
            kept.update(registry.validate_group_config({key: value}))
        except registry.SettingError as exc:
            warnings.append(f"group {name!r}: config {key} left out ({exc})")
    return kept


def store_groups(plan: GroupsPlan) -> Tally:
    """Saves the new and changed groups (call inside the phase's transaction)."""
    tally = Tally()
    for item in plan.groups:
        if item.new:
            item.group.save()
            tally.created += 1
        elif item.changed:
            item.group.save()
            tally.updated += 1
        else:
            tally.unchanged += 1
    return tally


def count_groups(plan: GroupsPlan) -> Tally:
    """What `store_groups` would do, for a dry run."""
    return Tally(
        created=sum(p.new for p in plan.groups),
        updated=sum(p.changed and not p.new for p in plan.groups),
        unchanged=sum(not p.changed and not p.new for p in plan.groups),
    )


# Aggregate members -----------------------------------------------------------------------


def import_members(
    rows: Iterable[Mapping[str, Any]], groups: Mapping[int, GroupPlan], *, dry_run: bool
) -> Tally:
    """Adds GPT-Load's memberships (or sets their weight); refuses with `ImportRefused`
    those our rules refuse, before storing any. Memberships of groups that no longer
    exist are skipped."""
    tally = Tally()
    wanted: list[tuple[GroupPlan, GroupPlan, int]] = []
    problems: list[str] = []
    for row in rows:
        aggregate = groups.get(db.int_value(row.get("group_id")))
        member = groups.get(db.int_value(row.get("sub_group_id")))
        if aggregate is None or member is None:
            tally.skipped += 1
            continue
        weight = min(max(db.int_value(row.get("weight")), 0), MAX_WEIGHT)
        if problem := _membership_problem(aggregate.group, member.group):
            problems.append(f"{aggregate.group.name} → {member.group.name}: {problem}")
            continue
        wanted.append((aggregate, member, weight))
    if problems:
        raise ImportRefused(_some(problems, "aggregate membership"))
    for aggregate, member, weight in wanted:
        tally += _store_member(aggregate, member, weight, dry_run=dry_run)
    return tally


def _membership_problem(aggregate: Group, member: Group) -> str:
    if not aggregate.is_aggregate:
        return "the first group is not an aggregate"
    if member.is_aggregate:
        return "only standard groups can be members"
    if member.channel_type != aggregate.channel_type:
        return (
            f"the member is a {member.channel_type} group, the aggregate {aggregate.channel_type}"
        )
    return ""


def _store_member(aggregate: GroupPlan, member: GroupPlan, weight: int, *, dry_run: bool) -> Tally:
    stored = None
    if aggregate.group.pk and member.group.pk:
        stored = GroupSubGroup.objects.filter(group=aggregate.group, sub_group=member.group).first()
    if stored is not None and stored.weight == weight:
        return Tally(unchanged=1)
    if not dry_run:
        if stored is None:
            GroupSubGroup.objects.create(
                group=aggregate.group, sub_group=member.group, weight=weight
            )
        else:
            stored.weight = weight
            stored.save(update_fields=["weight", "updated_at"])
    return Tally(created=1) if stored is None else Tally(updated=1)


# Keys ------------------------------------------------------------------------------------


@dataclass
class KeyCheck:
    """How GPT-Load's stored keys read under the cipher given for them."""

    total: int = 0
    unreadable: int = 0
    plaintext: int = 0  # of the unreadable ones, those that read as plaintext
    first_unreadable: list[int] = field(default_factory=list)


def read_secret(source: Cipher, stored: str, key_hash: str) -> str | None:
    """The plaintext of a key GPT-Load stored, if it reads under `source` (and matches
    its hash when the row has one); else None."""
    try:
        secret = source.decrypt(stored)
    except DecryptionError:
        return None
    if key_hash and source.hash(secret) != key_hash:
        return None  # e.g. ciphertext read as plaintext when no key was given
    return secret or None


def check_keys(rows: Sequence[Mapping[str, Any]], source: Cipher, check: KeyCheck) -> None:
    """Adds a batch of `api_keys` rows to `check`: which ones do not read under `source`."""
    plain = Cipher("")
    for row in rows:
        check.total += 1
        stored, key_hash = db.text_value(row["key_value"]), db.text_value(row.get("key_hash"))
        if read_secret(source, stored, key_hash) is not None:
            continue
        check.unreadable += 1
        if len(check.first_unreadable) < PROBLEMS_SHOWN:
            check.first_unreadable.append(db.int_value(row["id"]))
        if source.enabled and read_secret(plain, stored, key_hash) is not None:
            check.plaintext += 1


def import_keys(
    rows: Sequence[Mapping[str, Any]],
    groups: Mapping[int, GroupPlan],
    source: Cipher,
    *,
    dry_run: bool,
) -> Tally:
    """Stores a batch of GPT-Load's keys the groups do not hold yet (by hash), encrypted
    under our ENCRYPTION_KEY, with their status, notes and counters. `created`: keys
    added; `unchanged`: keys the group held already; `skipped`: keys of groups that no
    longer exist. Every row must read under `source` (`check_keys` first)."""
    ours = current_cipher()
    tally = Tally()
    by_group: dict[int, dict[str, Mapping[str, Any]]] = defaultdict(dict)
    secrets: dict[str, str] = {}
    for row in rows:
        plan = groups.get(db.int_value(row.get("group_id")))
        if plan is None or plan.group.is_aggregate:
            tally.skipped += 1
            continue
        secret = read_secret(
            source, db.text_value(row["key_value"]), db.text_value(row.get("key_hash"))
        )
        if secret is None:
            raise ImportRefused(
                f"key {row['id']} does not decrypt, though every key did a moment ago: "
                "is GPT-Load still writing to its database?"
            )
        digest = ours.hash(secret)
        if digest in by_group[plan.source_id]:
            tally.unchanged += 1  # the same key twice in one GPT-Load group
            continue
        by_group[plan.source_id][digest] = row
        secrets[digest] = secret
    for source_id, fresh in by_group.items():
        plan = groups[source_id]
        held = _held(plan.group, list(fresh)) if plan.group.pk else set()
        new = [(digest, row) for digest, row in fresh.items() if digest not in held]
        tally.unchanged += len(fresh) - len(new)
        tally.created += len(new)
        if new and not dry_run:
            APIKey.objects.bulk_create(
                [_key(plan.group, secrets[d], d, row, ours) for d, row in new],
                ignore_conflicts=True,
            )
    return tally


def _held(group: Group, hashes: list[str]) -> set[str]:
    return set(
        APIKey.objects.filter(group=group, key_hash__in=hashes).values_list("key_hash", flat=True)
    )


def _key(group: Group, secret: str, digest: str, row: Mapping[str, Any], ours: Cipher) -> APIKey:
    return APIKey(
        group=group,
        key_value=ours.encrypt(secret),
        key_hash=digest,
        status=STATUSES.get(db.text_value(row.get("status")), KeyStatus.INVALID),
        notes=db.text_value(row.get("notes"))[:255],
        request_count=max(db.int_value(row.get("request_count")), 0),
        failure_count=max(db.int_value(row.get("failure_count")), 0),
        last_used_at=db.time_value(row.get("last_used_at")),
    )


def keys_changed(groups: Iterable[GroupPlan]) -> None:
    """Bulk inserts send no model signals: reload every group that took keys."""
    for plan in groups:
        if plan.group.pk:
            group_changed(plan.group.pk)


def _first_error(exc: ValidationError) -> str:
    if hasattr(exc, "error_dict"):
        name, errors = next(iter(exc.error_dict.items()))
        return f"{name}: {errors[0].messages[0]}"
    return exc.messages[0]


def _some(problems: list[str], noun: str) -> str:
    more = f" (and {len(problems) - PROBLEMS_SHOWN} more)" if len(problems) > PROBLEMS_SHOWN else ""
    return (
        f"{len(problems)} {noun}{'s' * (len(problems) != 1)} cannot be imported as "
        f"{'they are' if len(problems) != 1 else 'it is'}: {'; '.join(problems[:PROBLEMS_SHOWN])}"
        f"{more}"
    )
