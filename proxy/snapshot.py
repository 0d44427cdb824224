"""The in-process snapshot of groups, keys and settings that the hot path reads.

Built from the database off the hot path; requests never query the database. A change
rebuilds only what it touched (`apply()`): one group's change reloads that group and its
keys, a settings change recomputes every group's settings but keeps the key pools, and
only a change of everything (re-encrypted keys) reloads all. Key states live on the
`KeyEntry` objects, which a rebuild carries over, so a key benched a moment ago stays
benched whatever the database has caught up with.

Everything a request needs is worked out here once per group: the effective settings as
plain values, the upstream timeouts, the header rules, the digests of the proxy keys.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from access.models import AccessKey, AccessRule
from gptload.lib.crypto import DecryptionError, current_cipher
from gptload.lib.providers import provider_for
from gptload.lib.providers.base import Provider
from gptload.lib.providers.headers import HeaderRules
from keys.caps import KeyCaps
from keys.models import APIKey, Group, GroupSubGroup, KeyStatus
from keys.states import KeyEntry, KeyPool, SharedState, key_states
from settings_app import registry
from settings_app.changes import Change
from settings_app.models import ChangeScope, SystemSetting

log = logging.getLogger("gptload.proxy")
LOADED = (KeyStatus.ACTIVE, KeyStatus.COOLING)


def digest(secret: str) -> bytes:
    """What a proxy key is looked up by: comparing digests leaks nothing about the key."""
    return hashlib.sha256(secret.encode()).digest()


class WeightedPicker:
    """Smooth weighted round robin (nginx's), weight 0 = never chosen."""

    def __init__(self, items: Iterable[tuple[Any, int]]) -> None:
        self.items = [(item, weight) for item, weight in items if weight > 0]
        self.current = [0] * len(self.items)
        self.total = sum(weight for _, weight in self.items)

    def pick(self, allowed: Any = None) -> Any:
        if len(self.items) == 1 and allowed is None:
            return self.items[0][0]
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


@dataclass(frozen=True)
class ClientSettings:
    """What tells one upstream connection pool from another."""

    proxy_url: str
    max_idle: int
    max_idle_per_host: int
    idle_timeout: int


@dataclass(eq=False)
class GroupView:
    id: int
    name: str
    channel: str
    provider: Provider
    is_aggregate: bool
    enabled: bool
    settings: dict[str, Any]
    proxy_keys: frozenset[bytes]
    upstreams: WeightedPicker
    header_rules: HeaderRules
    redirects: dict[str, str]
    strict: bool
    param_overrides: dict[str, Any]
    pool: KeyPool
    failover_codes: frozenset[int]
    attempts: int  # max_retries + 1
    threshold: int  # blacklist_threshold
    log_bodies: bool
    timeout: aiohttp.ClientTimeout
    stream_timeout: aiohttp.ClientTimeout
    client: ClientSettings
    caps: KeyCaps | None = None  # key_rpm, key_rpd, key_max_concurrency; None: no cap
    key_wait: float = 0.0  # key_wait_seconds
    member_weights: tuple[tuple[int, int], ...] = ()
    members: WeightedPicker = field(default_factory=lambda: WeightedPicker([]))


@dataclass
class Snapshot:
    version: int
    groups: dict[str, GroupView]
    by_id: dict[int, GroupView]
    system: dict[str, Any]
    global_keys: frozenset[bytes]
    access: dict[bytes, AccessRule] = field(default_factory=dict)  # by the secret's digest
    built_at: float = field(default_factory=time.time)


# Building -----------------------------------------------------------------------------------


def build(version: int, previous: Snapshot | None = None) -> Snapshot:
    """Everything, read from the database (sync ORM: call it off the event loop)."""
    system = registry.effective(None, SystemSetting.objects.typed_values())
    old_keys = _keys_of(previous.by_id.values()) if previous else {}
    pools: dict[int, list[KeyEntry]] = {}
    rows = APIKey.objects.filter(status__in=LOADED).order_by("id")
    for entry in _entries(rows, old_keys):
        pools.setdefault(entry.group_id, []).append(entry)
    views = {}
    for group in Group.objects.all():
        old = previous.by_id.get(group.pk) if previous else None
        views[group.pk] = _view(group, system, KeyPool(pools.get(group.pk, ())), old)
    _add_memberships(views, GroupSubGroup.objects.all())
    snapshot = _snapshot(version, views, system, access_views())
    _overlay_shared(snapshot, views.keys())
    return snapshot


def apply(previous: Snapshot, version: int, changes: set[Change]) -> Snapshot:
    """`previous` with `changes` applied: only what they name is read again."""
    if any(scope == ChangeScope.ALL for scope, _ in changes):
        return build(version, previous)
    views = dict(previous.by_id)
    system = previous.system
    relink = any(scope == ChangeScope.SETTINGS for scope, _ in changes)
    if relink:
        system = registry.effective(None, SystemSetting.objects.typed_values())
        for group in Group.objects.all():
            old = views.get(group.pk)
            pool = old.pool if old is not None else _load_pool(group.pk, {})
            views[group.pk] = _view(group, system, pool, old)
    touched = {group_id for scope, group_id in changes if scope == ChangeScope.GROUP and group_id}
    for group_id in touched:
        old = views.pop(group_id, None)
        row = Group.objects.filter(pk=group_id).first()
        if row is None:
            continue  # deleted
        pool = _load_pool(group_id, old.pool.keys if old is not None else {})
        views[group_id] = _view(row, system, pool, old)
    if touched or relink:  # every view rebuilt above must be linked to its members again
        aggregates = [v.id for v in views.values() if v.is_aggregate]
        memberships = GroupSubGroup.objects.filter(group_id__in=aggregates)
        _add_memberships(views, memberships)
    access = previous.access
    if any(scope == ChangeScope.ACCESS for scope, _ in changes):
        access = access_views()
    snapshot = _snapshot(version, views, system, access)
    _overlay_shared(snapshot, touched)
    return snapshot


def _snapshot(
    version: int,
    views: dict[int, GroupView],
    system: dict[str, Any],
    access: dict[bytes, AccessRule],
) -> Snapshot:
    proxy_keys = frozenset(digest(k) for k in str(system["proxy_keys"]).split(",") if k)
    groups = {v.name: v for v in views.values()}
    return Snapshot(version, groups, views, system, proxy_keys, access)


def access_views() -> dict[bytes, AccessRule]:
    """The enabled access keys, by the digest of their secret (two queries)."""
    return {rule.digest: rule for rule in AccessKey.objects.rules()}


def _keys_of(views: Iterable[GroupView]) -> dict[int, KeyEntry]:
    return {key.id: key for view in views for key in view.pool.keys.values()}


def _load_pool(group_id: int, old_keys: dict[int, KeyEntry]) -> KeyPool:
    rows = APIKey.objects.filter(group_id=group_id, status__in=LOADED).order_by("id")
    return KeyPool(_entries(rows, old_keys))


def _entries(rows: Any, old_keys: dict[int, KeyEntry]) -> Iterable[KeyEntry]:
    """In-memory keys for stored rows; a key already in memory keeps its object (requests
    in flight report to it) and its state, unless the database's is newer."""
    cipher = current_cipher()
    for row in rows.values_list(
        "id", "group_id", "key_value", "key_hash", "status", "cooling_until",
        "consecutive_failures", "status_changed_at", "created_at",
    ).iterator(2000):  # fmt: skip
        key_id, group_id, stored, key_hash, status, until, failures, changed, created = row
        changed_at = (changed or created).timestamp() if (changed or created) else 0.0
        until_s = until.timestamp() if until else 0.0
        old = old_keys.get(key_id)
        if old is not None and old.stored == stored:
            if changed_at > old.changed_at:
                old.adopt(status, until_s, failures, changed_at)
            yield old
            continue
        try:
            secret = cipher.decrypt(stored)
        except DecryptionError:
            continue  # shown as "cannot decrypt" in the admin; never sent upstream
        entry = KeyEntry(key_id, group_id, secret, key_hash, stored, status, until_s, failures,
                         changed_at)  # fmt: skip
        if old is not None and old.changed_at > changed_at:
            entry.adopt(old.status, old.cooling_until, old.consecutive_failures, old.changed_at)
        yield entry


def _view(group: Group, system: dict[str, Any], pool: KeyPool, old: GroupView | None) -> GroupView:
    settings = registry.effective(group.config, system)
    caps = KeyCaps.of(settings)
    if old is not None:
        pool.backoff_until = max(pool.backoff_until, old.pool.backoff_until)
        if old.caps != caps:
            pool = _without_holds(pool)
    upstreams = [
        (str(u["url"]).rstrip("/"), int(u.get("weight", 1))) for u in group.upstreams or []
    ]
    connect = float(settings["connect_timeout"])
    return GroupView(
        id=group.pk, name=group.name, channel=group.channel_type,
        provider=provider_for(group.channel_type), is_aggregate=group.is_aggregate,
        enabled=group.enabled, settings=settings,
        proxy_keys=frozenset(digest(k) for k in group.proxy_key_list),
        upstreams=WeightedPicker(upstreams),
        header_rules=HeaderRules(group.header_rules or (), group.name),
        redirects=dict(group.model_redirect_rules or {}), strict=group.model_redirect_strict,
        param_overrides=dict(group.param_overrides or {}), pool=pool,
        failover_codes=registry.parse_status_codes(settings["failover_status_codes"]),
        attempts=int(settings["max_retries"]) + 1, threshold=int(settings["blacklist_threshold"]),
        log_bodies=bool(settings["enable_request_body_logging"]),
        # A plain answer has request_timeout in all; a stream, response_header_timeout
        # for its headers and between its chunks, and no end it must reach in time.
        timeout=aiohttp.ClientTimeout(total=float(settings["request_timeout"]), connect=connect,
                                      sock_connect=connect),
        stream_timeout=aiohttp.ClientTimeout(connect=connect, sock_connect=connect,
                                             sock_read=float(settings["response_header_timeout"])),
        client=ClientSettings(str(settings["proxy_url"]), int(settings["max_idle_conns"]),
                              int(settings["max_idle_conns_per_host"]),
                              int(settings["idle_conn_timeout"])),
        caps=caps, key_wait=float(settings["key_wait_seconds"]),
    )  # fmt: skip


def _without_holds(pool: KeyPool) -> KeyPool:
    """The group's caps changed: the keys held for the old ones come back now (the new
    caps hold them again at their next pick if they must). A new pool, since the event
    loop may be picking from the live one."""
    for key in pool.keys.values():
        key.held_until = 0.0
    fresh = KeyPool(pool.keys.values())
    fresh.backoff_until = pool.backoff_until
    return fresh


def _add_memberships(views: dict[int, GroupView], memberships: Iterable[GroupSubGroup]) -> None:
    """Links every aggregate to the current views of its members."""
    weights: dict[int, list[tuple[int, int]]] = {}
    for membership in memberships:
        weights.setdefault(membership.group_id, []).append(
            (membership.sub_group_id, membership.weight)
        )
    for view_id, view in list(views.items()):
        if not view.is_aggregate:
            continue
        member_weights = tuple(weights.get(view_id, ()))
        members = [(views[m], w) for m, w in member_weights if m in views]
        views[view_id] = replace(
            view, member_weights=member_weights, members=WeightedPicker(members)
        )


def _overlay_shared(snapshot: Snapshot, group_ids: Iterable[int]) -> None:
    """Key states other nodes shared and the database has not caught up with yet."""
    wanted = set(group_ids)
    if not wanted:
        return
    for state in key_states.read_shared():
        view = snapshot.by_id.get(state.group_id)
        if view is None or view.id not in wanted:
            continue
        key_states.adopt(view.pool, view.pool.keys.get(state.id), state)


__all__ = ["GroupView", "KeyEntry", "SharedState", "Snapshot", "apply", "build", "digest"]
