"""The tally of keys per group and state (`KeyTally`) stays equal to the keys themselves
through every write that adds, removes or moves keys, and under concurrent writers."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection, connections
from django.db.models import Count
from django.utils import timezone

from keys import groups, services
from keys.admin import set_state
from keys.checker import Outcome, _store
from keys.models import APIKey, Group, KeyStatus, KeyTally
from keys.periodic import recount_keys
from keys.states import KeyEntry, Verdict, expire_cooling, write_states
from logs.dashboard import key_states

pytestmark = pytest.mark.django_db


def make_group(name: str) -> Group:
    return Group.objects.create(
        name=name, channel_type="openai", test_model="gpt-4.1-nano",
        upstreams=[{"url": "https://api.openai.com", "weight": 1}],
    )  # fmt: skip


def truth() -> dict[tuple[int, str], int]:
    rows = APIKey.objects.order_by().values_list("group_id", "status").annotate(n=Count("pk"))
    return {(group_id, status): n for group_id, status, n in rows}


def tally() -> dict[tuple[int, str], int]:
    rows = KeyTally.objects.exclude(count=0).values_list("group_id", "status", "count")
    return {(group_id, status): n for group_id, status, n in rows}


def assert_true() -> None:
    assert tally() == truth()


@pytest.fixture
def group():
    return make_group("pool")


def secrets(prefix: str, n: int) -> list[str]:
    return [f"sk-{prefix}-{i:06d}-abcdefghijklmnop" for i in range(n)]


def test_imports_deletes_restores_and_clears_move_the_tally(group):
    added = services.import_keys(group, secrets("a", 50) + secrets("a", 5))  # repeats ignored
    assert (added["added_count"], added["total_in_group"]) == (50, 50)
    assert tally() == {(group.pk, KeyStatus.ACTIVE): 50}
    APIKey.objects.filter(
        group=group, pk__in=list(APIKey.objects.values_list("pk", flat=True)[:20])
    ).update(status=KeyStatus.INVALID)
    assert tally() == {(group.pk, KeyStatus.ACTIVE): 30, (group.pk, KeyStatus.INVALID): 20}
    invalid = [k.secret for k in APIKey.objects.filter(status=KeyStatus.INVALID)[:5]]
    assert services.restore_keys(group, invalid)["restored_count"] == 5
    assert_true()
    assert services.delete_keys(group, [*secrets("a", 3), "sk-not-held"])["deleted_count"] == 3
    assert_true()
    assert services.restore_all_invalid(group) == 15
    assert tally() == {(group.pk, KeyStatus.ACTIVE): 47}
    APIKey.objects.filter(group=group).exclude(
        pk__in=list(APIKey.objects.values_list("pk", flat=True)[:7])
    ).update(status=KeyStatus.INVALID)
    assert services.clear_keys(group, KeyStatus.INVALID) == 40
    assert tally() == {(group.pk, KeyStatus.ACTIVE): 7}
    assert services.clear_keys(group) == 7
    assert tally() == {}
    assert services.count_keys(group) == 0


def test_orm_writes_are_counted(group):
    other = make_group("other")
    key = APIKey.build(group, "sk-one-abcdefghijklmnop")
    key.save()
    key.status = KeyStatus.DISABLED
    key.save()
    key.save(update_fields=["notes"])
    assert tally() == {(group.pk, KeyStatus.DISABLED): 1}
    key.group = other
    key.save()
    assert tally() == {(other.pk, KeyStatus.DISABLED): 1}
    key.delete()
    assert tally() == {}
    APIKey.objects.bulk_create(
        APIKey.build(group, s, status=KeyStatus.COOLING) for s in secrets("b", 4)
    )
    APIKey.objects.bulk_create(
        [APIKey.build(group, s) for s in secrets("b", 6)],
        ignore_conflicts=True,  # 4 held
    )
    assert tally() == {(group.pk, KeyStatus.COOLING): 4, (group.pk, KeyStatus.ACTIVE): 2}
    APIKey.objects.filter(status=KeyStatus.COOLING)[:1].get().delete()
    APIKey.objects.filter(status=KeyStatus.COOLING).delete()  # QuerySet.delete, signals and all
    assert tally() == {(group.pk, KeyStatus.ACTIVE): 2}
    assert APIKey.objects.filter(group=group).update(notes="not a move") == 2
    assert_true()


def test_the_proxys_write_behind_the_checker_expiry_and_the_operator_move_the_tally(group):
    services.import_keys(group, secrets("c", 12))
    keys = list(APIKey.objects.order_by("pk"))
    now = time.time()
    entries = [KeyEntry(k.pk, group.pk, k.secret, k.key_hash, k.key_value) for k in keys[:6]]
    for entry in entries[:3]:
        entry.status, entry.cooling_until = KeyStatus.COOLING, now - 1  # already over
    for entry in entries[3:]:
        entry.status = KeyStatus.INVALID
    gone = KeyEntry(10**9, group.pk, "sk-gone", "h", "s", KeyStatus.INVALID)  # deleted meanwhile
    write_states([*entries, gone], {entries[3].id: "401"})
    write_states(entries[:1], {})  # the same state again moves nothing
    assert tally() == {(group.pk, KeyStatus.ACTIVE): 6, (group.pk, KeyStatus.COOLING): 3,
                       (group.pk, KeyStatus.INVALID): 3}  # fmt: skip
    assert expire_cooling(timezone.now()) == 3
    assert tally() == {(group.pk, KeyStatus.ACTIVE): 9, (group.pk, KeyStatus.INVALID): 3}
    checked = list(APIKey.objects.filter(pk__in=[k.pk for k in keys[2:6]]))
    _store([(k, Outcome(Verdict.OK if k.status == KeyStatus.INVALID else Verdict.INVALID, "x"))
            for k in checked], timezone.now())  # fmt: skip
    assert tally() == {(group.pk, KeyStatus.ACTIVE): 11, (group.pk, KeyStatus.INVALID): 1}
    assert (
        set_state(APIKey.objects.filter(pk__in=[k.pk for k in keys[:4]]), KeyStatus.DISABLED) == 4
    )
    assert_true()
    assert key_states() == {KeyStatus.ACTIVE: 8, KeyStatus.COOLING: 0, KeyStatus.INVALID: 0,
                            KeyStatus.DISABLED: 4}  # fmt: skip


def test_copies_and_deletions_of_groups_keep_the_tally(group):
    services.import_keys(group, secrets("d", 9))
    APIKey.objects.filter(pk__in=list(APIKey.objects.values_list("pk", flat=True)[:4])).update(
        status=KeyStatus.INVALID
    )
    copy = groups.copy_group(group, "valid_only")
    counts = groups.key_counts([group.pk, copy.pk])
    assert (counts[copy.pk].total_keys, counts[group.pk].invalid_keys) == (5, 4)
    assert_true()
    assert groups.delete_group(group) == 9
    assert_true()
    assert not KeyTally.objects.filter(group_id=group.pk).exists()


def test_the_daily_recount_mends_a_tally_edited_behind_our_back(group):
    services.import_keys(group, secrets("e", 5))
    other = make_group("other")
    KeyTally.objects.filter(group=group).update(count=999)
    KeyTally.objects.create(group=other, status=KeyStatus.INVALID, count=3)
    with connection.cursor() as cursor:  # a key changed with SQL, around the ORM
        sql = "UPDATE keys_apikey SET status = 'disabled' WHERE id = %s"
        cursor.execute(sql, [APIKey.objects.earliest("pk").pk])
    assert recount_keys() == 2
    assert tally() == {(group.pk, KeyStatus.ACTIVE): 4, (group.pk, KeyStatus.DISABLED): 1}


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_never_lose_or_double_a_move():
    """Threads with their own connections import, bench, restore, expire, disable and
    delete keys of the same groups at once; the tally ends equal to the keys."""
    if connection.vendor == "sqlite":
        pytest.skip("SQLite has one writer at a time: there is no concurrency to race")
    pools = [make_group(f"race-{n}") for n in range(2)]
    for pool in pools:
        services.import_keys(pool, secrets(pool.name, 300))
    errors: list[BaseException] = []
    rng = random.Random(7)

    def worker(seed: int) -> None:
        local = random.Random(seed)
        try:
            for round_ in range(15):
                pool = local.choice(pools)
                ids = list(APIKey.objects.filter(group=pool).values_list("pk", flat=True))
                chosen = local.sample(ids, min(len(ids), 25))
                action = local.randrange(5)
                if action == 0:
                    rows = {k.pk: k for k in APIKey.objects.filter(pk__in=chosen)}
                    entries = [KeyEntry(pk, pool.pk, "s", "h", "v") for pk in rows]
                    for entry in entries:
                        entry.status = local.choice(KeyStatus.values)
                        entry.cooling_until = time.time() - 1
                    write_states(entries, {})
                elif action == 1:
                    set_state(APIKey.objects.filter(pk__in=chosen), local.choice(KeyStatus.values))
                elif action == 2:
                    APIKey.objects.filter(pk__in=chosen[:5]).remove()
                elif action == 3:
                    services.import_keys(pool, secrets(f"{pool.name}-{seed}-{round_}", 10))
                else:
                    expire_cooling(timezone.now() + timedelta(hours=1))
                    services.restore_all_invalid(pool)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(rng.randrange(10**6),)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not errors
    assert_true()
    assert Counter(dict(tally())).total() == APIKey.objects.count()
