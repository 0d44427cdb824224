from __future__ import annotations

import pytest
from django.core.checks import run_checks
from django.test import override_settings

from gptload.lib.secrets import constant_time_in, mask, weakness


def test_mask_never_shows_the_whole_secret():
    assert mask("sk-abcdefghijklmnop") == "sk-a…mnop"
    assert mask("short") == "****"
    assert mask("") == ""


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        ("sk-123456", "published default"),
        ("", "empty"),
        ("my-password-is-long-enough", "'password'"),
        ("abcdefgh", "only 8 characters"),
        ("aaaaaaaaaaaaaaaaaaaaaaaa", "too few distinct"),
    ],
)
def test_weak_secrets_are_explained(secret, reason):
    assert reason in (weakness(secret) or "")


def test_a_long_random_secret_is_not_weak():
    assert weakness("sk-Qm8v2LrT9xWc4NbZ7pKd1HsY") is None


def test_membership_is_checked_against_every_secret():
    assert constant_time_in("b", ["a", "b"])
    assert not constant_time_in("c", ["a", "b"])
    assert not constant_time_in("", [])


def test_the_deploy_check_warns_about_a_weak_auth_key_and_other_commands_do_not():
    with override_settings(AUTH_KEY="sk-123456"):
        assert "gptload.W001" not in [m.id for m in run_checks()]
        ids = [m.id for m in run_checks(include_deployment_checks=True)]
    assert "gptload.W001" in ids
    with override_settings(AUTH_KEY="sk-Qm8v2LrT9xWc4NbZ7pKd1HsY", ENCRYPTION_KEY="short"):
        ids = [m.id for m in run_checks(include_deployment_checks=True)]
    assert "gptload.W001" not in ids
    assert "gptload.W002" in ids
