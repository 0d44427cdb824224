"""`import_keys`, `export_keys`, `delete_keys`, `validate_keys`: in process and as a shell
runs them (exit code, stdout, stderr).

The commands run as jobs whose progress a thread of their own stores, so these tests
commit (`transaction=True`); the subprocess runs use the test database itself.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from django.core.management import ManagementUtility, call_command
from django.core.management.base import CommandError, OutputWrapper
from django.db import connection

from conftest import ROOT, base_env
from keys import jobs
from keys.management.cli import ProgressBar
from keys.models import APIKey, Group, JobKind, KeyJob, KeyStatus
from tests.fakeprovider import Behaviour, FakeProvider

pytestmark = pytest.mark.django_db(transaction=True)
GOOD = "sk-good-0123456789abcdef"
BAD = "sk-bad-0123456789abcdef"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def run(command: str, *args: str, stdin: str | None = None) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    extra = {"stdin": Pipe(stdin)} if stdin is not None else {}
    call_command(command, *args, stdout=out, stderr=err, **extra)
    return out.getvalue(), err.getvalue()


def refused(command: str, *args: str, stdin: str | None = None) -> str:
    with pytest.raises(CommandError) as caught:
        run(command, *args, stdin=stdin)
    assert caught.value.returncode == 1
    assert "\n" not in str(caught.value)
    return str(caught.value)


def make_group(name: str = "pool", upstream: str = "https://api.openai.com") -> Group:
    return Group.objects.create(name=name, channel_type="openai", test_model="m",
                                upstreams=[{"url": upstream, "weight": 1}])  # fmt: skip


def add_key(group: Group, secret: str, status: str = KeyStatus.ACTIVE) -> APIKey:
    key = APIKey.build(group, secret, status=status)
    key.save()
    return key


def secrets_of(group: Group) -> set[str]:
    return {key.secret for key in APIKey.objects.filter(group=group)}


@pytest.fixture
def group() -> Group:
    return make_group()


# import_keys ---------------------------------------------------------------------------------


def test_import_keys_reads_a_file_and_records_a_job(group, tmp_path):
    add_key(group, "sk-held-0123456789")
    path = tmp_path / "keys.txt"
    path.write_bytes(b"\xef\xbb\xbfsk-a-0123456789\r\nsk-b-0123456789, sk-held-0123456789\r\n")
    out, err = run("import_keys", "pool", str(path))
    assert out == ("Added 2 keys to pool; 1 ignored (already in the group or repeated). "
                   "The group now holds 3 keys.\n")  # fmt: skip
    assert err == ""  # no progress bar off a terminal
    assert secrets_of(group) == {"sk-held-0123456789", "sk-a-0123456789", "sk-b-0123456789"}
    job = KeyJob.objects.get()
    assert (job.kind, job.status, job.processed, job.total) == ("import", "succeeded", 3, 3)
    assert job.result == {"added_count": 2, "ignored_count": 1, "total_in_group": 3}
    assert job.running_group_id is None


def test_import_keys_reads_stdin(group):
    out, _ = run("import_keys", "pool", "-", stdin='["sk-a-0123456789", "sk-b-0123456789"]')
    assert out.startswith("Added 2 keys to pool;")
    assert secrets_of(group) == {"sk-a-0123456789", "sk-b-0123456789"}
    quiet, _ = run("import_keys", "pool", "-", "--verbosity", "0", stdin="sk-c-0123456789")
    assert quiet == ""
    assert len(secrets_of(group)) == 3


@pytest.mark.parametrize(
    ("args", "stdin", "words"),
    [
        (("nope", "-"), "sk-a", "unknown group 'nope'"),
        (("pool", "/no/such/file.txt"), None, "/no/such/file.txt: No such file or directory"),
        (("pool", "-"), " \n ", "No keys found"),
        (("pool", "-"), "sk-a sk-b\x00c", "1 of 2 keys refused"),
    ],
)
def test_import_keys_refuses_with_one_line(group, args, stdin, words):
    assert words in refused("import_keys", *args, stdin=stdin)
    assert not APIKey.objects.exists()
    assert not KeyJob.objects.exists()


def test_import_keys_does_not_wait_on_a_terminal(group, monkeypatch):
    monkeypatch.setattr(sys, "stdin", Terminal())
    assert "pipe them in" in refused("import_keys", "pool")


def test_import_keys_refuses_while_the_group_has_a_job(group):
    jobs.create(group, JobKind.VALIDATE, running=True)
    assert "already running for this group" in refused("import_keys", "pool", "-", stdin="sk-a")
    assert not APIKey.objects.exists()


def test_an_interrupted_import_frees_its_group(group, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("keys.services.import_keys", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run("import_keys", "pool", "-", stdin="sk-a")
    job = KeyJob.objects.get()
    assert (job.status, job.error, job.running_group_id) == ("failed", "interrupted", None)


def test_import_keys_into_an_aggregate_group_is_refused():
    Group.objects.create(name="agg", channel_type="openai", group_type="aggregate")
    assert "aggregate group" in refused("import_keys", "agg", "-", stdin="sk-a")


# export_keys ---------------------------------------------------------------------------------


def test_export_keys_writes_plaintext_keys_to_stdout(group):
    add_key(group, "sk-a-0123456789")
    add_key(group, "sk-b-0123456789", KeyStatus.INVALID)
    add_key(make_group("other"), "sk-c-0123456789")
    assert run("export_keys", "pool") == ("sk-a-0123456789\nsk-b-0123456789\n", "")
    assert run("export_keys", "pool", "--status", "invalid") == ("sk-b-0123456789\n", "")
    assert run("export_keys", "pool", "--status", "cooling") == ("", "")


def test_export_keys_writes_a_file_only_its_owner_reads(group, tmp_path):
    add_key(group, "sk-a-0123456789")
    target = tmp_path / "keys.txt"
    out, err = run("export_keys", "pool", "-o", str(target))
    assert (out, err) == ("", f"Exported 1 key of pool to {target}.\n")
    assert target.read_text() == "sk-a-0123456789\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_export_keys_refuses_an_unknown_group_or_an_unwritable_file(group, tmp_path):
    assert "unknown group" in refused("export_keys", "nope")
    assert "No such file or directory" in refused(
        "export_keys", "pool", "-o", str(tmp_path / "no" / "x")
    )


# delete_keys ---------------------------------------------------------------------------------


def test_delete_keys_removes_the_listed_keys(group, tmp_path):
    for secret in ("sk-a-0123456789", "sk-b-0123456789", "sk-c-0123456789"):
        add_key(group, secret)
    path = tmp_path / "gone.txt"
    path.write_text("sk-a-0123456789\nsk-x-0123456789\n")
    out, _ = run("delete_keys", "pool", str(path))
    assert out == ("Deleted 1 key from pool; 1 ignored (not in the group or repeated). "
                   "The group now holds 2 keys.\n")  # fmt: skip
    assert secrets_of(group) == {"sk-b-0123456789", "sk-c-0123456789"}
    assert KeyJob.objects.get().kind == "delete"


def test_delete_keys_by_status(group):
    add_key(group, "sk-a-0123456789")
    add_key(group, "sk-b-0123456789", KeyStatus.INVALID)
    other = make_group("other")
    add_key(other, "sk-c-0123456789", KeyStatus.INVALID)
    out, _ = run("delete_keys", "pool", "--status", "invalid")
    assert out == "Deleted 1 key (invalid) from pool.\n"
    assert secrets_of(group) == {"sk-a-0123456789"}
    assert secrets_of(other) == {"sk-c-0123456789"}


def test_delete_keys_wants_a_list_or_a_status_not_both(group, tmp_path):
    add_key(group, "sk-a-0123456789")
    path = tmp_path / "gone.txt"
    path.write_text("sk-a-0123456789")
    assert "not both" in refused("delete_keys", "pool", str(path), "--status", "invalid")
    assert APIKey.objects.count() == 1


# validate_keys -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fake:
        yield fake


def test_validate_keys_checks_the_group_in_this_process(provider):
    provider.reset()
    group = make_group(upstream=provider.url)
    good, bad = add_key(group, GOOD, KeyStatus.INVALID), add_key(group, BAD, KeyStatus.ACTIVE)
    off = add_key(group, "sk-off-0123456789abcdef", KeyStatus.DISABLED)
    provider.behave(BAD, Behaviour(status=401))
    out, _ = run("validate_keys", "pool")
    assert out == "Checked 2 keys of pool: 1 valid, 1 invalid.\n"
    for key in (good, bad, off):
        key.refresh_from_db()
    assert (good.status, bad.status, off.status) == ("active", "invalid", "disabled")
    job = KeyJob.objects.get()
    assert (job.kind, job.status, job.processed, job.total) == ("validate", "succeeded", 2, 2)
    out, _ = run("validate_keys", "pool", "--status", "invalid")
    assert out == "Checked 1 key of pool: 0 valid, 1 invalid.\n"


def test_validate_keys_refuses_a_group_without_upstream():
    Group.objects.create(name="bare", channel_type="openai", test_model="m",
                         upstreams=[{"url": "https://x.example", "weight": 0}])  # fmt: skip
    add_key(Group.objects.get(name="bare"), "sk-a-0123456789", KeyStatus.INVALID)
    assert "no upstream with a weight above 0" in refused("validate_keys", "bare")
    assert KeyJob.objects.get().status == "failed"


# The progress bar ----------------------------------------------------------------------------


def test_the_progress_bar_draws_on_a_terminal_only():
    screen = Terminal()
    with ProgressBar(OutputWrapper(screen), "importing") as bar:
        bar(0, 4)
        bar(1, 4)  # too soon after the last drawing: skipped
        bar(4, 4)  # the end is always drawn
    assert screen.getvalue() == (
        "\rimporting [------------------------------] 0/4   0%"
        "\rimporting [##############################] 4/4 100%\n"
    )
    piped = Pipe()
    with ProgressBar(OutputWrapper(piped), "importing") as bar:
        bar(4, 4)
    assert piped.getvalue() == ""


def test_the_commands_draw_a_progress_bar_on_a_terminal(group):
    err = Terminal()
    call_command(
        "import_keys", "pool", "-", stdin=Pipe("sk-a sk-b"), stdout=io.StringIO(), stderr=err
    )
    assert err.getvalue().startswith("\rimporting into pool [")
    assert err.getvalue().endswith("2/2 100%\n")


# As a shell runs them --------------------------------------------------------------------------


def database_env() -> dict[str, str]:
    """The environment of a process on this test's (committed) database."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        dsn = f"sqlite:///{Path(db['NAME']).resolve()}"
    else:
        auth = quote(db["USER"], safe="")
        if db["PASSWORD"]:
            auth += ":" + quote(db["PASSWORD"], safe="")
        dsn = f"mysql://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 3306}/{db['NAME']}"
    env = base_env(DATABASE_DSN=dsn, AUTH_KEY="sk-test-0123456789abcdefghij")
    if os.environ.get("REDIS_DSN"):
        env["REDIS_DSN"] = os.environ["REDIS_DSN"]
    return env


def shell(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args], input=stdin, env=database_env(),
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_from_a_shell_piped_keys_go_in_and_come_out(group):
    imported = shell("import_keys", "pool", "-", stdin="sk-a-0123456789\nsk-b-0123456789\n")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("Added 2 keys to pool;")
    assert imported.stderr == ""  # piped: no progress bar
    exported = shell("export_keys", "pool")
    assert (exported.returncode, exported.stdout, exported.stderr) == (
        0, "sk-a-0123456789\nsk-b-0123456789\n", "")  # fmt: skip
    assert secrets_of(group) == {"sk-a-0123456789", "sk-b-0123456789"}


def test_from_a_shell_a_failure_exits_1_with_one_line(group):
    result = shell("delete_keys", "nope", "--status", "invalid")
    assert result.returncode == 1
    assert result.stdout == ""
    assert (
        result.stderr
        == "CommandError: unknown group 'nope' (group names are listed in the admin)\n"
    )


@pytest.mark.parametrize("command", ["import_keys", "export_keys", "delete_keys", "validate_keys"])
def test_each_command_explains_itself(command, capsys):
    # In this process, as `manage.py` runs it (a Django start of its own costs seconds).
    with pytest.raises(SystemExit) as exited:
        ManagementUtility(["manage.py", command, "--help"]).execute()
    assert exited.value.code in (0, None)
    out = capsys.readouterr().out
    assert f"manage.py {command}" in out
    assert "group" in out
