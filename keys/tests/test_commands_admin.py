from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from conftest import manage
from gptload.lib.crypto import Cipher
from keys.management.commands.create_group import parse_upstream
from keys.models import APIKey, Group, GroupSubGroup
from logs.models import RequestLog
from settings_app.models import ConfigVersion

pytestmark = pytest.mark.django_db
OLD = "the-old-encryption-key-0123456789"
NEW = "the-new-encryption-key-9876543210"
PLAIN = Cipher("")


def run(command: str, *args: str, stdout: io.StringIO | None = None) -> str:
    out = stdout or io.StringIO()
    call_command(command, *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def refused(command: str, *args: str) -> str:
    with pytest.raises(CommandError) as caught:
        run(command, *args)
    assert caught.value.returncode == 1
    message = str(caught.value)
    assert "\n" not in message
    return message


# create_group ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "url", "weight"),
    [
        ("https://api.openai.com", "https://api.openai.com", 1),
        ("https://api.openai.com/:3", "https://api.openai.com/", 3),
        ("https://example.com/v1:7", "https://example.com/v1", 7),
        ("http://10.0.0.5:8080", "http://10.0.0.5:8080", 1),
        ("http://10.0.0.5:8080:2", "http://10.0.0.5:8080", 2),
        ("http://[::1]:8080", "http://[::1]:8080", 1),
        ("http://[::1]:8080:4", "http://[::1]:8080", 4),
        ("http://user:pw@host:9000", "http://user:pw@host:9000", 1),
        ("https://api.openai.com:443:0", "https://api.openai.com:443", 0),
    ],
)
def test_an_upstream_weight_is_read_only_after_the_host_part(value, url, weight):
    assert parse_upstream(value) == {"url": url, "weight": weight}


def test_it_creates_a_standard_group_and_prints_its_endpoint():
    out = run(
        "create_group", "openai-main", "--channel", "openai",
        "--upstream", "https://api.openai.com", "--upstream", "http://10.0.0.5:8080:3",
        "--test-model", "gpt-4.1-nano", "--display-name", "OpenAI",
        "--proxy-keys", "sk-a, sk-b,sk-a",
    )  # fmt: skip

    group = Group.objects.get(name="openai-main")
    assert group.channel_type == "openai"
    assert group.group_type == "standard"
    assert group.upstreams == [
        {"url": "https://api.openai.com", "weight": 1},
        {"url": "http://10.0.0.5:8080", "weight": 3},
    ]
    assert (group.test_model, group.display_name, group.proxy_keys) == (
        "gpt-4.1-nano", "OpenAI", "sk-a,sk-b",
    )  # fmt: skip
    assert f"id {group.pk}" in out
    assert "endpoint:   http://localhost:" in out
    assert out.rstrip().endswith("/proxy/openai-main")
    assert "sk-a" not in out


def test_it_creates_an_aggregate_group_with_weighted_members():
    for name in ("east", "west"):
        run("create_group", name, "--channel", "anthropic", "--upstream", "https://a.example",
            "--test-model", "claude")  # fmt: skip

    out = run("create_group", "claude-all", "--channel", "anthropic", "--aggregate",
              "--member", "east:3", "--member", "west")  # fmt: skip

    aggregate = Group.objects.get(name="claude-all")
    assert aggregate.is_aggregate
    assert aggregate.test_model == "-"
    members = dict(aggregate.members.values_list("sub_group__name", "weight"))
    assert members == {"east": 3, "west": 1}
    assert "member:     east (weight 3)" in out


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["Bad Name", "--channel", "openai", "--upstream", "https://x.example", "--test-model", "m"],
         "NAME: Use 1-100 lowercase letters"),
        (["g", "--channel", "openai", "--upstream", "https://x.example"],
         "--test-model: Name the model used to validate keys."),
        (["g", "--channel", "openai", "--test-model", "m"],
         "--upstream: Add at least one upstream URL."),
        (["g", "--channel", "openai", "--upstream", "ftp://x.example", "--test-model", "m"],
         "--upstream: Upstream 1: 'ftp://x.example' is not an http:// or https:// URL."),
        (["g", "--channel", "openai", "--upstream", "https://x.example/:0", "--test-model", "m"],
         "--upstream: At least one upstream needs a weight above 0"),
        (["g", "--channel", "openai", "--aggregate", "--upstream", "https://x.example"],
         "an aggregate group has no upstreams or test model of its own"),
        (["g", "--channel", "openai", "--upstream", "https://x.example", "--test-model", "m",
          "--member", "other"], "--member needs --aggregate"),
        (["g", "--channel", "openai", "--aggregate", "--member", "nobody"],
         "--member nobody: no group has that name"),
        (["g", "--channel", "openai", "--aggregate", "--member", "x:heavy"],
         "--member x:heavy: write NAME or NAME:WEIGHT"),
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_in_one_line_and_nothing_is_created(args, reason):
    assert reason in refused("create_group", *args)
    assert not Group.objects.exists()


def test_a_duplicate_name_is_refused():
    args = ["dup", "--channel", "gemini", "--upstream", "https://g.example", "--test-model", "m"]
    run("create_group", *args)

    assert refused("create_group", *args) == "a group named 'dup' already exists"
    assert Group.objects.count() == 1


def test_a_member_the_aggregate_cannot_take_rolls_the_whole_group_back():
    run("create_group", "oa", "--channel", "openai", "--upstream", "https://o.example",
        "--test-model", "m")  # fmt: skip
    run("create_group", "an", "--channel", "anthropic", "--upstream", "https://a.example",
        "--test-model", "m")  # fmt: skip

    message = refused("create_group", "mixed", "--channel", "openai", "--aggregate",
                      "--member", "oa:1", "--member", "an:1")  # fmt: skip

    assert "'an'" in message
    assert "Member must be a openai group like the aggregate." in message
    assert not Group.objects.filter(name="mixed").exists()
    assert not GroupSubGroup.objects.exists()


def test_create_group_exits_non_zero_with_one_line_on_stderr(store_env):
    bad_value = manage("create_group", "Bad Name", "--channel", "openai", env=store_env)
    assert bad_value.returncode == 1
    # Django's system-check warnings (a weak AUTH_KEY here) may come first.
    assert [line for line in bad_value.stderr.splitlines() if "Error" in line] == [
        "CommandError: NAME: Use 1-100 lowercase letters, digits, '-' or '_' (it becomes the "
        "URL segment /proxy/<name>/).; --test-model: Name the model used to validate keys.; "
        "--upstream: Add at least one upstream URL."
    ]
    bad_channel = manage("create_group", "g", "--channel", "azure", env=store_env)
    assert bad_channel.returncode == 2
    assert "invalid choice: 'azure'" in bad_channel.stderr


# migrate_keys ---------------------------------------------------------------------------


@pytest.fixture
def group() -> Group:
    return Group.objects.create(
        name="pool", channel_type="openai", test_model="m",
        upstreams=[{"url": "https://o.example", "weight": 1}],
    )  # fmt: skip


def store(group: Group, secrets: list[str], cipher: Cipher) -> None:
    APIKey.objects.bulk_create(
        APIKey(group=group, key_value=cipher.encrypt(s), key_hash=cipher.hash(s)) for s in secrets
    )


def log_for(secret: str, cipher: Cipher, count: int = 1) -> None:
    RequestLog.objects.bulk_create(
        RequestLog(timestamp=datetime.now(UTC), status_code=200, key_value=cipher.encrypt(secret),
                   key_hash=cipher.hash(secret))
        for _ in range(count)
    )  # fmt: skip


def assert_all_under(cipher: Cipher, secrets: list[str]) -> None:
    rows = APIKey.objects.order_by("id").values_list("key_value", "key_hash")
    assert [cipher.decrypt(value) for value, _ in rows] == secrets
    assert [key_hash for _, key_hash in rows] == [cipher.hash(s) for s in secrets]


SECRETS = [f"sk-secret-{n:04d}-abcdefghij" for n in range(5)]


def test_it_encrypts_plaintext_keys_and_their_logs(group, django_capture_on_commit_callbacks):
    store(group, SECRETS, PLAIN)
    log_for(SECRETS[0], PLAIN, count=3)
    log_for("sk-of-a-deleted-key-0123", PLAIN)
    version = ConfigVersion.current()

    with django_capture_on_commit_callbacks(execute=True):  # the command runs in autocommit
        out = run("migrate_keys", "--to", NEW)

    assert_all_under(Cipher(NEW), SECRETS)
    assert all(
        s not in v for s in SECRETS for v in APIKey.objects.values_list("key_value", flat=True)
    )
    logs = list(RequestLog.objects.values_list("key_value", "key_hash"))
    assert sorted(Cipher(NEW).decrypt(v) for v, _ in logs) == sorted(
        [SECRETS[0]] * 3 + ["sk-of-a-deleted-key-0123"]
    )
    assert all(h == Cipher(NEW).hash(Cipher(NEW).decrypt(v)) for v, h in logs)
    assert "Keys: 5 re-encrypted, 0 already under the new key, 5 in all." in out
    assert "Request logs: 4 rows re-encrypted." in out
    assert "set ENCRYPTION_KEY to the --to value and restart" in out
    assert NEW not in out
    assert ConfigVersion.current() == version + 1


def test_it_rotates_encrypted_keys_to_a_new_key(group, settings):
    store(group, SECRETS, Cipher(OLD))
    log_for(SECRETS[1], Cipher(OLD))

    run("migrate_keys", "--from", OLD, "--to", NEW)

    assert_all_under(Cipher(NEW), SECRETS)
    settings.ENCRYPTION_KEY = NEW
    assert APIKey.objects.with_secret(group, SECRETS[2]).get().secret == SECRETS[2]
    assert RequestLog.objects.get().key_hash == Cipher(NEW).hash(SECRETS[1])


def test_it_decrypts_keys_back_to_plaintext(group):
    store(group, SECRETS, Cipher(OLD))

    out = run("migrate_keys", "--from", OLD)

    assert list(APIKey.objects.order_by("id").values_list("key_value", flat=True)) == SECRETS
    assert_all_under(PLAIN, SECRETS)
    assert "unset ENCRYPTION_KEY and restart" in out


def test_it_works_through_more_keys_than_one_batch(group):
    secrets = [f"sk-many-{n:05d}-abcdefghij" for n in range(2100)]
    store(group, secrets, PLAIN)

    out = run("migrate_keys", "--to", NEW)

    assert "Keys: 2100 re-encrypted" in out
    assert_all_under(Cipher(NEW), secrets)


def test_it_changes_nothing_when_a_key_does_not_decrypt(group):
    store(group, SECRETS[:3], Cipher(OLD))
    store(group, SECRETS[3:4], Cipher("a-third-encryption-key-000000"))
    before = list(APIKey.objects.order_by("id").values_list("key_value", "key_hash"))
    stranger = APIKey.objects.order_by("id").last()
    assert stranger is not None

    message = refused("migrate_keys", "--from", OLD, "--to", NEW)

    assert message.startswith(
        "1 of 4 keys do not decrypt with --from (nor with --to); nothing was changed."
    )
    assert message.endswith(f"Key ids: {stranger.pk}")
    assert list(APIKey.objects.order_by("id").values_list("key_value", "key_hash")) == before


def test_it_refuses_to_encrypt_keys_that_are_already_encrypted(group):
    store(group, SECRETS, Cipher(OLD))

    message = refused("migrate_keys", "--to", NEW)

    assert "5 of 5 keys do not decrypt with --from" in message
    assert "empty means plaintext" in message
    assert_all_under(Cipher(OLD), SECRETS)


def test_it_refuses_a_migration_to_the_same_key(group):
    store(group, SECRETS, Cipher(OLD))

    assert refused("migrate_keys", "--from", OLD, "--to", OLD) == (
        "--from and --to are the same: there is nothing to migrate"
    )
    assert refused("migrate_keys").startswith("--from and --to are the same")


def test_a_rerun_finishes_an_interrupted_migration(group):
    store(group, SECRETS, Cipher(OLD))
    log_for(SECRETS[0], Cipher(OLD))
    # The first run got through the first rows (and their logs) before it was cut short.
    new = Cipher(NEW)
    for key in APIKey.objects.order_by("id")[:2]:
        plain = Cipher(OLD).decrypt(key.key_value)
        APIKey.objects.filter(pk=key.pk).update(
            key_value=new.encrypt(plain), key_hash=new.hash(plain)
        )
    RequestLog.objects.update(key_value=new.encrypt(SECRETS[0]), key_hash=new.hash(SECRETS[0]))

    out = run("migrate_keys", "--from", OLD, "--to", NEW)

    assert "Keys: 3 re-encrypted, 2 already under the new key, 5 in all." in out
    assert "Request logs: 0 rows re-encrypted." in out
    assert_all_under(new, SECRETS)
    again = run("migrate_keys", "--from", OLD, "--to", NEW)
    assert "Keys: 0 re-encrypted, 5 already under the new key, 5 in all." in again


def test_it_refuses_a_key_stored_twice_in_a_group_under_each_key(group):
    store(group, SECRETS[:2], Cipher(OLD))
    store(group, SECRETS[:1], Cipher(NEW))  # added again after a half-finished migration
    twin = APIKey.objects.order_by("id").first()
    assert twin is not None

    message = refused("migrate_keys", "--from", OLD, "--to", NEW)

    assert message.startswith("1 keys are stored twice in their group, once under each key")
    assert message.endswith(f"Key ids (under --from): {twin.pk}")
    assert APIKey.objects.filter(key_hash=Cipher(OLD).hash(SECRETS[0])).exists()


def test_the_same_secret_in_two_groups_is_not_a_clash(group):
    other = Group.objects.create(name="other", channel_type="openai", test_model="m",
                                 upstreams=[{"url": "https://o.example", "weight": 1}])  # fmt: skip
    store(group, SECRETS[:1], Cipher(OLD))
    store(other, SECRETS[:1], Cipher(NEW))

    assert "Keys: 1 re-encrypted, 1 already under the new key" in run(
        "migrate_keys", "--from", OLD, "--to", NEW
    )


def test_log_rows_that_do_not_read_under_the_old_key_are_left_alone(group):
    store(group, SECRETS[:1], PLAIN)
    log_for(SECRETS[0], Cipher("a-third-encryption-key-000000"), count=2)
    before = sorted(RequestLog.objects.values_list("key_value", "key_hash"))

    out = run("migrate_keys", "--to", NEW)

    assert "Request logs: 0 rows re-encrypted, 2 not under --from left as they were." in out
    assert sorted(RequestLog.objects.values_list("key_value", "key_hash")) == before


def test_skip_logs_leaves_the_logs_alone(group):
    store(group, SECRETS[:1], PLAIN)
    log_for(SECRETS[0], PLAIN)

    out = run("migrate_keys", "--to", NEW, "--skip-logs")

    assert "Request logs" not in out
    assert RequestLog.objects.get().key_value == SECRETS[0]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_progress_line_and_a_pipe_does_not(group):
    store(group, SECRETS, PLAIN)
    on_terminal = run("migrate_keys", "--to", NEW, stdout=Terminal())
    assert "\rRe-encrypting keys: 5/5 (100%)" in on_terminal

    piped = run("migrate_keys", "--from", NEW, "--to", OLD)
    assert "\r" not in piped


def test_migrate_keys_exits_non_zero_on_a_refusal(store_env):
    result = manage("migrate_keys", "--from", OLD, "--to", OLD, env=store_env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "CommandError: --from and --to are the same: there is nothing to migrate"
    )
