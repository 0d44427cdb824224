from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction
from django.test import override_settings

from gptload.lib.crypto import Cipher
from keys.models import APIKey, Group, KeyStatus

pytestmark = pytest.mark.django_db
ENCRYPTION = "an-encryption-key-for-tests-0123"


@pytest.fixture
def group():
    return Group.objects.create(
        name="openai", channel_type="openai", test_model="gpt-4.1-nano",
        upstreams=[{"url": "https://api.openai.com", "weight": 1}],
    )  # fmt: skip


def test_without_encryption_the_secret_is_stored_as_is(group):
    key = APIKey.build(group, "sk-live-abcdefghijkl")
    key.save()
    stored = APIKey.objects.get(pk=key.pk)
    assert stored.key_value == "sk-live-abcdefghijkl"
    assert stored.secret == "sk-live-abcdefghijkl"
    assert stored.masked == "sk-l…ijkl"
    assert stored.status == KeyStatus.ACTIVE


@override_settings(ENCRYPTION_KEY=ENCRYPTION)
def test_with_encryption_the_secret_is_encrypted_at_rest(group):
    APIKey.build(group, "sk-live-abcdefghijkl").save()
    stored = APIKey.objects.get()
    assert "sk-live" not in stored.key_value
    assert Cipher(ENCRYPTION).decrypt(stored.key_value) == "sk-live-abcdefghijkl"
    assert stored.secret == "sk-live-abcdefghijkl"
    assert stored.key_hash == Cipher(ENCRYPTION).hash("sk-live-abcdefghijkl")
    assert APIKey.objects.with_secret(group, "sk-live-abcdefghijkl").get() == stored


def test_a_key_under_another_encryption_key_is_shown_as_undecryptable(group):
    with override_settings(ENCRYPTION_KEY=ENCRYPTION):
        APIKey.build(group, "sk-live-abcdefghijkl").save()
    with override_settings(ENCRYPTION_KEY="a-different-encryption-key-987"):
        assert APIKey.objects.get().masked == "(cannot decrypt)"


def test_a_secret_is_stored_once_per_group_but_may_serve_several_groups(group):
    APIKey.build(group, "sk-dup").save()
    with pytest.raises(IntegrityError), transaction.atomic():
        APIKey.build(group, "sk-dup").save()
    other = Group.objects.create(
        name="other",
        channel_type="openai",
        test_model="m",
        upstreams=[{"url": "https://x.example", "weight": 1}],
    )
    APIKey.build(other, "sk-dup").save()
    assert APIKey.objects.filter(key_hash=Cipher("").hash("sk-dup")).count() == 2


def test_bulk_inserts_skip_duplicates(group):
    APIKey.objects.bulk_create([APIKey.build(group, f"sk-{i}") for i in range(5)])
    APIKey.objects.bulk_create(
        [APIKey.build(group, f"sk-{i}") for i in range(3, 8)], ignore_conflicts=True
    )
    assert APIKey.objects.filter(group=group).count() == 8


def test_active_for_lists_only_usable_keys(group):
    for status in KeyStatus:
        APIKey.build(group, f"sk-{status}", status=status).save()
    assert [k.secret for k in APIKey.objects.active_for(group)] == ["sk-active"]


def test_status_changes_record_when_and_why(group):
    from django.utils import timezone

    key = APIKey.build(group, "sk-a")
    until = timezone.now()
    key.set_status(KeyStatus.COOLING, until=until, error="429 rate limited")
    assert (key.status, key.cooling_until, key.last_error) == (
        KeyStatus.COOLING,
        until,
        "429 rate limited",
    )
    assert key.status_changed_at is not None
    key.set_status(KeyStatus.ACTIVE)
    assert key.cooling_until is None
