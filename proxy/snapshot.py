"""The in-process snapshot of groups, keys and settings that the hot path reads.

Built from the database off the hot path, swapped whole when the configuration version
moves; requests never query the database. Key states change in place on the `KeyEntry`
objects (a benched key is skipped at once) and are written to the database in batches.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from gptload.lib.crypto import DecryptionError, current_cipher
from keys.models import APIKey, Group, GroupSubGroup, KeyStatus
from proxy.providers import provider_for
from proxy.providers.base import Provider
from settings_app import registry
from settings_app.models import SystemSetting


@dataclass(eq=False)
class KeyEntry:
    id: int
    group_id: int
    secret: str
    hash: str
    stored: str
    status: str = KeyStatus.ACTIVE
    cooling_until: float = 0.0  # wall-clock seconds
    consecutive_failures: int = 0
    changed_at: float = 0.0  # when the database last saw its state change

    def adopt(self, status: str, until: float, failures: int, at: float) -> None:
        self.status, self.cooling_until, self.consecutive_failures = status, until, failures
        self.changed_at = at

    def usable(self, now: float) -> bool:
        if self.status == KeyStatus.ACTIVE:
            return True
        return self.status == KeyStatus.COOLING and self.cooling_until <= now


class KeyRing:
    """Round robin over a group's usable keys; a pick costs O(1) unless keys are benched."""

    def __init__(self, keys: list[KeyEntry]) -> None:
        self.keys = keys
        self._counter = itertools.count()

    def pick(self, now: float, exclude: set[int]) -> KeyEntry | None:
        count = len(self.keys)
        fallback = None
        for _ in range(count):
            key = self.keys[next(self._counter) % count]
            if not key.usable(now):
                continue
            if key.id not in exclude:
                return key
            fallback = fallback or key
        return fallback  # a small pool may repeat a key on retry, as GPT-Load does

    def remove(self, key: KeyEntry) -> None:
        if key in self.keys:
            self.keys = [k for k in self.keys if k is not key]

    def has_usable(self, now: float) -> bool:
        return any(key.usable(now) for key in self.keys)

    def next_ready_in(self, now: float) -> float | None:
        """Seconds until the first cooling key is usable again, or None if none cools."""
        waits = [k.cooling_until - now for k in self.keys if k.status == KeyStatus.COOLING]
        return max(0.0, min(waits)) if waits else None


class WeightedPicker:
    """Smooth weighted round robin (nginx's), weight 0 = never chosen."""

    def __init__(self, items: list[tuple[Any, int]]) -> None:
        self.items = [(item, weight) for item, weight in items if weight > 0]
        self.current = [0] * len(self.items)
        self.total = sum(weight for _, weight in self.items)

    def pick(self, allowed: Any = None) -> Any:
        best, best_index = None, -1
        for index, (item, weight) in enumerate(self.items):
            if allowed is not None and not allowed(item):
                continue
            self.current[index] += weight
            if best_index < 0 or self.current[index] > self.current[best_index]:
                best, best_index = item, index
        if best_index >= 0:
            self.current[best_index] -= self.total
        return best


@dataclass(eq=False)
class GroupView:
    id: int
    name: str
    channel: str
    provider: Provider
    is_aggregate: bool
    enabled: bool
    settings: dict[str, Any]
    proxy_keys: tuple[str, ...]
    upstreams: WeightedPicker
    header_rules: list[dict[str, str]]
    redirects: dict[str, str]
    strict: bool
    param_overrides: dict[str, Any]
    ring: KeyRing
    failover_codes: frozenset[int]
    members: WeightedPicker = field(default_factory=lambda: WeightedPicker([]))
    backoff_until: float = 0.0  # the whole pool is rate limited until then
    recent_429: list[tuple[float, KeyEntry]] = field(default_factory=list)


@dataclass
class Snapshot:
    version: int
    groups: dict[str, GroupView]
    global_proxy_keys: tuple[str, ...]
    system: dict[str, Any]
    keys_by_id: dict[int, KeyEntry]
    groups_by_id: dict[int, GroupView] = field(default_factory=dict)
    built_at: float = field(default_factory=time.time)


def build_snapshot(version: int, previous: Snapshot | None = None) -> Snapshot:
    """Reads every group, usable key and setting (sync ORM: call it off the event loop)."""
    system = registry.effective(None, SystemSetting.objects.typed_values())
    cipher = current_cipher()
    keys_by_group: dict[int, list[KeyEntry]] = {}
    keys_by_id: dict[int, KeyEntry] = {}
    rows = APIKey.objects.filter(status__in=[KeyStatus.ACTIVE, KeyStatus.COOLING]).order_by("id")
    for row in rows.values_list(
        "id", "group_id", "key_value", "key_hash", "status", "cooling_until",
        "consecutive_failures", "status_changed_at", "created_at",
    ).iterator(2000):  # fmt: skip
        key_id, group_id, stored, key_hash, status, until, failures, changed, created = row
        changed = changed or created
        try:
            secret = cipher.decrypt(stored)
        except DecryptionError:
            continue  # shown as "cannot decrypt" in the admin; never sent upstream
        entry = KeyEntry(
            key_id,
            group_id,
            secret,
            key_hash,
            stored,
            status,
            until.timestamp() if until else 0.0,
            failures,
            changed.timestamp() if changed else 0.0,
        )
        old = previous.keys_by_id.get(key_id) if previous else None
        if old is not None and old.changed_at > entry.changed_at:
            # Local state is newer than what the batched writer has stored so far.
            entry.adopt(old.status, old.cooling_until, old.consecutive_failures, old.changed_at)
        if entry.status in (KeyStatus.ACTIVE, KeyStatus.COOLING):
            keys_by_group.setdefault(group_id, []).append(entry)
            keys_by_id[key_id] = entry
    groups: dict[str, GroupView] = {}
    by_id: dict[int, GroupView] = {}
    previous_groups = {g.id: g for g in previous.groups.values()} if previous else {}
    for group in Group.objects.all():
        view = _group_view(group, system, keys_by_group.get(group.pk, []))
        if (old_view := previous_groups.get(group.pk)) is not None:
            view.backoff_until = old_view.backoff_until
        groups[group.name] = by_id[group.pk] = view
    for membership in GroupSubGroup.objects.all():
        parent, member = by_id.get(membership.group_id), by_id.get(membership.sub_group_id)
        if parent and member:
            parent.members.items.append((member, membership.weight))
    for view in groups.values():
        if view.is_aggregate:
            view.members = WeightedPicker(view.members.items)
    proxy_keys = tuple(k for k in str(system["proxy_keys"]).split(",") if k)
    return Snapshot(version, groups, proxy_keys, system, keys_by_id, by_id)


def _group_view(group: Group, system: dict[str, Any], keys: list[KeyEntry]) -> GroupView:
    settings = registry.effective(group.config, system)
    upstreams = [
        (str(u["url"]).rstrip("/"), int(u.get("weight", 1))) for u in group.upstreams or []
    ]
    return GroupView(
        id=group.pk, name=group.name, channel=group.channel_type, provider=provider_for(group.channel_type),
        is_aggregate=group.is_aggregate, enabled=group.enabled, settings=settings,
        proxy_keys=tuple(group.proxy_key_list), upstreams=WeightedPicker(upstreams),
        header_rules=list(group.header_rules or []), redirects=dict(group.model_redirect_rules or {}),
        strict=group.model_redirect_strict, param_overrides=dict(group.param_overrides or {}),
        ring=KeyRing(keys), failover_codes=registry.parse_status_codes(settings["failover_status_codes"]),
    )  # fmt: skip
