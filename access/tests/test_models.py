"""`AccessKey`: its secret, its validation, what the proxy loads, and the changes it announces."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from access.models import AccessKey, AccessRule, new_secret, secret_hash
from keys.models import Group
from proxy.snapshot import digest
from settings_app.models import ChangeScope, ConfigChange, ConfigVersion

pytestmark = pytest.mark.django_db
OPENAI = [{"url": "https://api.openai.com", "weight": 1}]


def group(name):
    return Group.objects.create(name=name, channel_type="openai", test_model="m", upstreams=OPENAI)


def access_key(name="ci", **fields):
    key = AccessKey(name=name, **fields)
    key.issue()
    key.full_clean()
    key.save()
    return key


def test_a_secret_is_gl_and_256_random_bits():
    secrets = {new_secret() for _ in range(50)}
    assert len(secrets) == 50
    assert all(s.startswith("gl-") and len(s) == 46 for s in secrets)


def test_issue_keeps_the_hash_and_a_hint_never_the_secret():
    key = AccessKey(name="ci")
    secret = key.issue()
    assert key.key_hash == hashlib.sha256(secret.encode()).hexdigest() == secret_hash(secret)
    assert bytes.fromhex(key.key_hash) == digest(secret)  # what the proxy looks keys up by
    assert key.key_hint == f"{secret[:4]}…{secret[-4:]}"
    assert secret not in key.key_hint


@pytest.mark.parametrize(
    ("patterns", "problem"),
    [
        ("gpt-*", "List the model patterns"),
        (["gpt-*", ""], "Model pattern 2 is empty"),
        (["  "], "Model pattern 1 is empty"),
        ([5], "Model pattern 1 is empty or not text"),
        (["x" * 201], "longer than 200"),
        ([f"m{n}" for n in range(101)], "At most 100 model patterns; 101 were given"),
    ],
)
def test_model_patterns_are_checked(patterns, problem):
    key = AccessKey(name="ci", models=patterns)
    key.issue()
    with pytest.raises(ValidationError) as refused:
        key.full_clean()
    assert problem in str(refused.value.message_dict["models"])


def test_patterns_are_trimmed_and_deduplicated():
    key = access_key(models=[" gpt-4o* ", "claude-*", "gpt-4o*"])
    assert key.models == ["gpt-4o*", "claude-*"]


def test_a_key_needs_a_name():
    key = AccessKey(name="   ")
    key.issue()
    with pytest.raises(ValidationError) as refused:
        key.full_clean()
    assert "name" in refused.value.message_dict


def test_an_expiry_every_database_can_store():
    key = AccessKey(name="ci", expires_at=datetime(999, 1, 1, tzinfo=UTC))
    key.issue()
    with pytest.raises(ValidationError) as refused:
        key.full_clean()
    assert "between the years 1000 and 9998" in str(refused.value)
    key.expires_at = datetime(2030, 1, 1, 8, 0)  # naive: the server's TZ
    key.full_clean()
    assert timezone.is_aware(key.expires_at)


def test_rules_load_enabled_keys_with_their_groups_in_two_queries():
    first, second = group("g1"), group("g2")
    scoped = access_key("scoped", models=["gpt-4o*"], rpm=5, daily_tokens=10**12)
    scoped.groups.set([first, second])
    soon = timezone.now() - timedelta(minutes=1)
    expired = access_key("expired", expires_at=soon)
    access_key("off", enabled=False)
    with CaptureQueriesContext(connection) as queries:
        rules = {rule.name: rule for rule in AccessKey.objects.rules()}
    assert len(queries.captured_queries) == 2
    assert set(rules) == {"scoped", "expired"}  # a disabled key is not loaded
    rule = rules["scoped"]
    assert rule == AccessRule(
        id=scoped.pk, name="scoped", digest=bytes.fromhex(scoped.key_hash),
        group_ids=frozenset({first.pk, second.pk}), models=("gpt-4o*",), rpm=5, tpm=0,
        daily_tokens=10**12, monthly_tokens=0, max_concurrency=0, expires_at=None,
    )  # fmt: skip
    assert rules["expired"].expires_at == expired.expires_at.timestamp()
    assert rules["expired"].expired(timezone.now().timestamp())
    assert not rule.expired(timezone.now().timestamp())


def test_a_rule_allows_its_groups_and_models():
    rule = AccessRule(1, "r", b"", frozenset({3}), ("gpt-4o*", "o3"), 0, 0, 0, 0, 0, None)
    assert [rule.allows_group(3), rule.allows_group(4)] == [True, False]
    shown = ["gpt-4o-mini", "o3", "o3-mini", "GPT-4o"]
    assert [rule.allows_model(m) for m in shown] == [True, True, False, False]
    anything = AccessRule(2, "a", b"", frozenset(), (), 0, 0, 0, 0, 0, None)
    assert [anything.allows_group(99), anything.allows_model("whatever")] == [True, True]


def changes(capture, call):
    before = ConfigVersion.current()
    with capture(execute=True):
        call()
    return set(ConfigChange.objects.filter(version__gt=before).values_list("scope", flat=True))


def test_every_change_to_an_access_key_reaches_the_proxy(django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    with capture(execute=True):  # the group's own change goes first
        some = group("g1")
    assert changes(capture, access_key) == {ChangeScope.ACCESS}
    key = AccessKey.objects.get()
    assert changes(capture, lambda: key.save()) == {ChangeScope.ACCESS}
    assert changes(capture, lambda: key.groups.add(some)) == {ChangeScope.ACCESS}
    assert changes(capture, lambda: key.groups.clear()) == {ChangeScope.ACCESS}
    assert changes(capture, lambda: key.delete()) == {ChangeScope.ACCESS}


def test_deleting_its_only_group_disables_a_key_instead_of_opening_every_group(
    django_capture_on_commit_callbacks,
):
    only, other = group("only"), group("other")
    alone = access_key("alone")
    alone.groups.set([only])
    both = access_key("both")
    both.groups.set([only, other])
    with django_capture_on_commit_callbacks(execute=True):
        only.delete()
    alone.refresh_from_db()
    both.refresh_from_db()
    assert (alone.enabled, list(alone.groups.all())) == (False, [])
    assert "only group, only, was deleted" in alone.notes
    assert (both.enabled, list(both.groups.all())) == (True, [other])
    latest = ConfigChange.objects.filter(version=ConfigVersion.current())
    assert ChangeScope.ACCESS in set(latest.values_list("scope", flat=True))
