"""The operators' console, page by page and action by action: what each shows, who may do
what, and what the database holds afterwards."""

from __future__ import annotations

import html
import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import Permission, User
from django.test import Client, override_settings

from keys.models import APIKey, Group, GroupSubGroup, KeyJob, KeyStatus
from logs.models import RequestLog
from settings_app.models import ConfigVersion, SystemSetting

pytestmark = pytest.mark.django_db
ADMIN_KEY = "sk-console-admin-key-0123456789abcdef"
SECRET = "sk-upstream-secret-abcdefghijkl"


@pytest.fixture(autouse=True)
def auth_key(settings):
    from django.core.cache import cache

    settings.AUTH_KEY = ADMIN_KEY
    cache.clear()  # failed sign-ins counted by an earlier test


@pytest.fixture
def group():
    group = Group.objects.create(name="main", channel_type="openai", test_model="m",
                                 upstreams=[{"url": "https://api.openai.com", "weight": 1}])  # fmt: skip
    APIKey.build(group, SECRET).save()
    return group


@pytest.fixture
def operator():
    client = Client()
    client.post("/admin/login/", {"username": "", "password": ADMIN_KEY})
    return client


@pytest.fixture
def viewer(client):
    """A staff user who may look at everything and change nothing."""
    user = User.objects.create_user("viewer", password="pw-0123456789", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__startswith="view_"))
    client.force_login(user)
    return client


# Signing in ---------------------------------------------------------------------------------


def test_the_auth_key_alone_signs_in_as_the_built_in_superuser(client):
    response = client.post("/admin/login/", {"username": "", "password": ADMIN_KEY})
    assert response.status_code == 302
    user = User.objects.get(username="gptload")
    assert (user.is_superuser, user.has_usable_password()) == (True, False)
    assert client.get("/admin/").status_code == 200


def test_a_django_user_signs_in_as_themselves(client):
    User.objects.create_user("ops", password="pw-0123456789", is_staff=True)
    assert (
        client.post("/admin/login/", {"username": "ops", "password": "pw-0123456789"}).status_code
        == 302
    )
    assert not User.objects.filter(username="gptload").exists()


def test_failed_sign_ins_are_limited_per_address(client):
    for _ in range(10):
        assert (
            client.post("/admin/login/", {"username": "", "password": "wrong"}).status_code == 200
        )
    locked = client.post("/admin/login/", {"username": "", "password": ADMIN_KEY})
    assert locked.status_code == 429
    assert "Too many failed sign-ins" in locked.content.decode()


def test_the_login_page_never_shows_the_key_and_no_published_default_works(client):
    assert ADMIN_KEY not in client.get("/admin/login/").content.decode()
    assert (
        client.post("/admin/login/", {"username": "", "password": "sk-123456"}).status_code == 200
    )


# Settings -----------------------------------------------------------------------------------


def test_the_settings_page_lists_every_setting_with_its_default(operator):
    page = operator.get("/admin/settings_app/systemsetting/").content.decode()
    from settings_app.registry import SETTINGS

    for setting in SETTINGS:
        assert f'id="setting-{setting.key}"' in page
    assert ADMIN_KEY not in page  # the global proxy keys start as the AUTH_KEY: masked


def test_a_setting_changed_on_the_page_is_stored_checked_and_announced(
    operator, django_capture_on_commit_callbacks
):
    form = current_form(operator)
    before = ConfigVersion.current()
    with django_capture_on_commit_callbacks(execute=True):
        response = operator.post("/admin/settings_app/systemsetting/", {**form, "max_retries": "5"})
    assert response.status_code == 302
    assert SystemSetting.objects.get(setting_key="max_retries").setting_value == "5"
    assert ConfigVersion.current() > before
    refused = operator.post("/admin/settings_app/systemsetting/", {**form, "max_retries": "-2"})
    assert "must be at least 0" in refused.content.decode()
    assert SystemSetting.objects.get(setting_key="max_retries").setting_value == "5"


def current_form(client: Client) -> dict[str, str]:
    from settings_app import registry
    from settings_app.registry import SETTINGS
    from settings_app.values import stored_values

    values = registry.effective(None, stored_values())
    form = {s.key: s.serialize(values[s.key]) for s in SETTINGS if s.kind is not bool}
    form["proxy_keys"] = ""  # shown masked: empty keeps them
    return form


def test_a_viewer_sees_settings_and_cannot_change_them(viewer):
    page = viewer.get("/admin/settings_app/systemsetting/").content.decode()
    assert "Save settings" not in page
    assert (
        viewer.post("/admin/settings_app/systemsetting/", {"max_retries": "1"}).status_code == 403
    )


# Groups and keys ----------------------------------------------------------------------------


def test_a_group_saved_with_edited_rows_stores_typed_json(operator, group):
    form = {
        "name": "main", "display_name": "", "description": "", "group_type": "standard",
        "channel_type": "openai", "test_model": "m", "validation_endpoint": "", "sort": "0",
        "enabled": "on", "proxy_keys": "sk-team-a-0123456789", "param_overrides": '{"temperature": 0.2}',
        "upstreams": json.dumps([{"url": "https://a.example", "weight": "3"}, {"url": "", "weight": ""}]),
        "header_rules": json.dumps([{"key": "X-Org", "value": "${GROUP_NAME}", "action": "set"}]),
        "model_redirect_rules": json.dumps([{"from": "gpt-4o", "to": "gpt-4.1"}]),
        "config": json.dumps([{"setting": "max_retries", "value": "7"}]),
        "members-TOTAL_FORMS": "0", "members-INITIAL_FORMS": "0",
    }  # fmt: skip
    response = operator.post(f"/admin/keys/group/{group.pk}/change/", form)
    assert response.status_code == 302, response.content.decode()[:3000]
    group.refresh_from_db()
    assert group.upstreams == [{"url": "https://a.example", "weight": 3}]  # the empty row dropped
    assert group.model_redirect_rules == {"gpt-4o": "gpt-4.1"}
    assert group.config == {"max_retries": 7}
    assert group.header_rules == [{"key": "X-Org", "value": "${GROUP_NAME}", "action": "set"}]


def test_the_group_list_shows_key_counts_and_the_endpoint(operator, group):
    APIKey.build(group, "sk-second-key-0123456789").save()
    APIKey.objects.filter(key_hash=APIKey.build(group, SECRET).key_hash).update(
        status=KeyStatus.INVALID
    )
    page = operator.get("/admin/keys/group/").content.decode()
    assert "/proxy/main" in page
    assert '<span class="text-green-600">1</span>' in page
    assert '<span class="text-red-600">1</span>' in page


def test_the_group_form_knows_each_channels_default_upstream_and_test_model(operator):
    page = operator.get("/admin/keys/group/add/").content.decode()
    found = re.search(r'data-defaults="([^"]+)"', page)
    assert found
    defaults = json.loads(html.unescape(found[1]))
    assert defaults["gemini"] == {"upstream": "https://generativelanguage.googleapis.com",
                                  "test_model": "gemini-2.0-flash-lite"}  # fmt: skip
    assert defaults["anthropic"]["test_model"] == "claude-3-haiku-20240307"


def test_deleting_a_group_counts_what_goes_then_deletes_its_keys_and_keeps_its_logs(
    operator, viewer, group, logs
):
    for n in range(3):
        APIKey.build(group, f"sk-more-{n}-0123456789abcdef").save()
    APIKey.objects.filter(key_hash=APIKey.build(group, SECRET).key_hash).update(
        status=KeyStatus.INVALID
    )
    aggregate = Group.objects.create(name="all", channel_type="openai", group_type="aggregate")
    GroupSubGroup.objects.create(group=aggregate, sub_group=group, weight=5)
    assert viewer.get(f"/admin/keys/group/{group.pk}/delete/").status_code == 403
    page = operator.get(f"/admin/keys/group/{group.pk}/delete/").content.decode()
    assert "4 keys (3 active, 0 cooling, 1 invalid, 0 disabled)" in page
    assert "1 aggregate memberships" in page
    assert SECRET not in page
    assert "sk-more" not in page
    response = operator.post(f"/admin/keys/group/{group.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Group.objects.filter(pk=group.pk).exists()
    assert not APIKey.objects.exists()
    assert not GroupSubGroup.objects.exists()
    assert RequestLog.objects.count() == 3
    assert Group.objects.filter(pk=aggregate.pk).exists()


def test_a_key_is_revealed_only_on_request_and_only_to_who_may_change_keys(operator, viewer, group):
    key = APIKey.objects.get()
    assert SECRET not in operator.get("/admin/keys/apikey/").content.decode()
    assert operator.post(f"/admin/keys/apikey/{key.pk}/reveal/").json() == {"key": SECRET}
    assert operator.get(f"/admin/keys/apikey/{key.pk}/reveal/").status_code == 405
    assert viewer.post(f"/admin/keys/apikey/{key.pk}/reveal/").status_code == 403


def test_the_key_list_says_why_a_key_is_benched_escaped_and_cut_to_fit(operator, group):
    reason = "401 Incorrect API key provided: sk-u…ijkl <script>x</script> " + "padding " * 20
    APIKey.objects.update(status=KeyStatus.INVALID, last_error=reason)
    page = operator.get("/admin/keys/apikey/").content.decode()
    assert "401 Incorrect API key provided: sk-u…ijkl &lt;script&gt;" in page
    assert "<script>x</script>" not in page
    shown = re.search(r'<span class="text-xs" title="[^"]*">([^<]*)</span>', page)
    assert shown
    assert len(html.unescape(shown[1])) == 60
    assert shown[1].endswith("…")


def test_a_whole_key_finds_its_row_in_any_group(operator, group):
    other = Group.objects.create(name="other", channel_type="openai", test_model="m",
                                 upstreams=[{"url": "https://x.example", "weight": 1}])  # fmt: skip
    APIKey.build(other, "sk-elsewhere-0123456789").save()
    page = operator.get("/admin/keys/apikey/", {"q": SECRET}).content.decode()
    assert "sk-u…ijkl" in page
    assert "sk-e…6789" not in page


@pytest.mark.parametrize("per_page", [1, 100])
def test_long_lists_are_paged_without_a_count_or_a_made_up_total(operator, group, per_page):
    from keys.admin import APIKeyAdmin

    APIKey.build(group, "sk-second-0123456789abcd").save()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(APIKeyAdmin, "list_per_page", per_page)
        page = operator.get("/admin/keys/apikey/").content.decode()
    assert "999999" not in page
    # "Every matching key" is offered only when there may be more than the page shows.
    assert ("Select every matching" in page) == (per_page == 1)


def test_a_deep_page_shows_the_same_rows_as_one_long_page_would(operator, group):
    from keys.admin import APIKeyAdmin

    for n in range(6):
        APIKey.build(group, f"sk-paged-{n}-0123456789abcdef").save()

    def shown(per_page, page):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(APIKeyAdmin, "list_per_page", per_page)
            html_page = operator.get("/admin/keys/apikey/", {"p": page}).content.decode()
        return re.findall(r'data-reveal="/admin/keys/apikey/(\d+)/reveal/"', html_page)

    everything = shown(100, 1)
    assert len(everything) == 7
    assert shown(3, 1) + shown(3, 2) + shown(3, 3) == everything
    assert shown(3, 4) == []


@pytest.mark.parametrize(
    ("action", "before", "after"),
    [("disable_selected", KeyStatus.ACTIVE, KeyStatus.DISABLED),
     ("enable_selected", KeyStatus.DISABLED, KeyStatus.ACTIVE),
     ("restore_selected", KeyStatus.INVALID, KeyStatus.ACTIVE)],
)  # fmt: skip
def test_bulk_key_actions_change_the_state_and_move_the_version(
    operator, group, action, before, after
):
    key = APIKey.objects.get()
    APIKey.objects.filter(pk=key.pk).update(status=before, consecutive_failures=4)
    version = ConfigVersion.current()
    response = operator.post(
        "/admin/keys/apikey/", {"action": action, "_selected_action": [key.pk]}
    )
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.status == after
    if after == KeyStatus.ACTIVE:
        assert key.consecutive_failures == 0
    assert ConfigVersion.current() >= version  # on commit (the test holds one transaction)


def test_selected_keys_are_exported_in_plaintext_to_who_may_change_them(operator, group):
    key = APIKey.objects.get()
    response = operator.post(
        "/admin/keys/apikey/", {"action": "export_selected", "_selected_action": [key.pk]}
    )
    assert response.content.decode().strip() == SECRET
    assert response["Content-Disposition"].startswith("attachment")


def test_a_groups_keys_are_exported_all_active_or_invalid_from_its_page(operator, group):
    APIKey.build(group, "sk-benched-0123456789abcdef").save()
    APIKey.objects.filter(key_hash=APIKey.build(group, "sk-benched-0123456789abcdef").key_hash
                          ).update(status=KeyStatus.INVALID)  # fmt: skip
    page = operator.get(f"/admin/keys/group/{group.pk}/change/").content.decode()
    exports = {"export-keys": {SECRET, "sk-benched-0123456789abcdef"},
               "export-active-keys": {SECRET}, "export-invalid-keys": {"sk-benched-0123456789abcdef"}}  # fmt: skip
    for path, expected in exports.items():
        assert f"/admin/keys/group/{group.pk}/{path}/" in page  # offered in the export menu
        response = operator.get(f"/admin/keys/group/{group.pk}/{path}/")
        assert set(response.content.decode().split()) == expected
        assert response["Content-Disposition"].startswith("attachment")


def test_importing_keys_from_a_group_page_starts_a_job_with_a_progress_page(
    operator, group, monkeypatch
):
    from keys import jobs

    monkeypatch.setattr(jobs, "_enqueue", lambda job: None)  # no worker in this test
    response = operator.post(f"/admin/keys/group/{group.pk}/import-keys/",
                             {"text": "sk-new-one-0123456789 sk-new-two-0123456789"})  # fmt: skip
    job = KeyJob.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/admin/keys/keyjob/{job.pk}/change/"
    assert (job.kind, job.total) == ("import", 2)
    page = operator.get(response["Location"]).content.decode()
    assert "job-bar" in page
    progress = operator.get(f"/admin/keys/keyjob/{job.pk}/progress/").json()["data"]
    assert (progress["total"], progress["is_running"]) == (2, True)


def test_an_import_of_nothing_is_refused_with_the_reason(operator, group):
    page = operator.post(
        f"/admin/keys/group/{group.pk}/import-keys/", {"text": "  "}
    ).content.decode()
    assert "no key" in page.lower()
    assert not KeyJob.objects.exists()


def test_deleting_invalid_keys_asks_first_and_counts(operator, group):
    APIKey.objects.update(status=KeyStatus.INVALID)
    ask = operator.get(f"/admin/keys/group/{group.pk}/clear-invalid/").content.decode()
    assert "1 invalid keys" in ask
    assert APIKey.objects.count() == 1
    operator.post(f"/admin/keys/group/{group.pk}/clear-invalid/")
    assert APIKey.objects.count() == 0


def test_a_viewer_cannot_import_reveal_or_export(viewer, group):
    assert (
        viewer.post(
            f"/admin/keys/group/{group.pk}/import-keys/", {"text": "sk-x-0123456789"}
        ).status_code
        == 403
    )
    for path in ("export-keys", "export-active-keys", "export-invalid-keys"):
        assert viewer.get(f"/admin/keys/group/{group.pk}/{path}/").status_code == 403
    assert viewer.get("/admin/keys/group/").status_code == 200


# Logs ---------------------------------------------------------------------------------------


@pytest.fixture
def logs(group):
    from gptload.lib.crypto import current_cipher

    now = datetime.now(UTC)
    cipher = current_cipher()
    rows = [
        ("gpt-4.1", 200, True, now - timedelta(minutes=5), "", SECRET),
        ("gpt-4.1", 429, False, now - timedelta(hours=3), "rate limited <b>x</b>", SECRET),
        ("claude", 500, False, now - timedelta(days=2), "boom", "sk-other-key-0123456789"),
    ]
    for model, status, ok, when, error, key in rows:
        RequestLog.objects.create(timestamp=when, group_id=group.pk, group_name="main", model=model,
                                  status_code=status, is_success=ok, error_message=error,
                                  key_value=cipher.encrypt(key), key_hash=cipher.hash(key))  # fmt: skip


@pytest.mark.parametrize(
    ("query", "expected"),
    [({"status": "429"}, {429}), ({"model": "claude"}, {500}), ({"key": SECRET}, {200, 429}),
     ({"error": "BOOM"}, {500}), ({"is_success__exact": "1"}, {200})],
)  # fmt: skip
def test_the_log_list_filters_on_every_column(operator, logs, query, expected):
    assert statuses_shown(operator, query) == expected


def statuses_shown(client, query):
    page = client.get("/admin/logs/requestlog/", query).content.decode()
    return {int(status) for status in
            re.findall(r'data-label="Status">\s*<span[^>]*>\s*(\d{3})\s*</span>', page)}  # fmt: skip


def test_the_log_list_filters_on_a_time_range_in_the_consoles_time_zone(operator, logs, settings):
    now = datetime.now(UTC)
    day = (now - timedelta(days=2)).strftime("%Y-%m-%d")
    assert statuses_shown(operator, {"timestamp_from_0": day, "timestamp_to_0": day}) == {500}
    # "From 2 hours ago" typed as a wall-clock time: in UTC it lets in only the newest row; read
    # in Tokyo (UTC+9) the same digits mean 11 hours ago, and the 3-hour-old row comes in too.
    since = now - timedelta(hours=2)
    typed = {"timestamp_from_0": since.strftime("%Y-%m-%d"),
             "timestamp_from_1": since.strftime("%H:%M:%S")}  # fmt: skip
    assert statuses_shown(operator, typed) == {200}
    settings.TIME_ZONE = "Asia/Tokyo"
    assert statuses_shown(operator, typed) == {200, 429}
    page = operator.get("/admin/logs/requestlog/", {"timestamp_from_0": "yesterday"})
    assert page.status_code == 200
    assert "Not a date and time" in page.content.decode()


def test_the_group_filter_finds_a_members_calls_and_an_aggregates_own(operator, logs, group):
    aggregate = Group.objects.create(name="all", channel_type="openai", group_type="aggregate")
    RequestLog.objects.create(timestamp=datetime.now(UTC), group_id=group.pk, group_name="main",
                              parent_group_id=aggregate.pk, parent_group_name="all",
                              status_code=418, is_success=False)  # fmt: skip
    assert statuses_shown(operator, {"group": group.pk}) == {200, 429, 500, 418}
    assert statuses_shown(operator, {"group": aggregate.pk}) == {418}


def test_logs_are_exported_as_csv_with_the_filters_and_keys_masked(operator, logs):
    response = operator.get("/admin/logs/requestlog/export-csv/", {"status": "429"})
    text = async_to_sync(read_all)(response.streaming_content)
    lines = text.strip().splitlines()
    assert lines[0].startswith("timestamp,group_name")
    assert len(lines) == 2
    assert ",429," in lines[1]
    assert SECRET not in text
    assert "sk-u…ijkl" in text


async def read_all(stream) -> str:
    return b"".join([chunk async for chunk in stream]).decode()


def test_a_log_row_page_escapes_upstream_text(operator, logs):
    row = RequestLog.objects.get(status_code=429)
    page = operator.get(f"/admin/logs/requestlog/{row.pk}/change/").content.decode()
    assert "<b>x</b>" not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page


@override_settings(LANGUAGE_CODE="en")
def test_the_console_answers_in_the_browsers_language(operator):
    page = operator.get("/admin/", HTTP_ACCEPT_LANGUAGE="zh-Hans").content.decode()
    assert 'lang="zh-hans"' in page
    assert "仪表盘" in page  # the sidebar, from the project's own catalog


@pytest.mark.parametrize("language", ["zh_Hans", "ja"])
def test_every_console_string_is_translated_in_the_compiled_catalogs(language):
    """The .mo files are committed build output: they must hold every msgid of the .po."""
    import gettext
    from pathlib import Path

    from django.conf import settings as django_settings

    folder = Path(django_settings.BASE_DIR) / "locale" / language / "LC_MESSAGES"
    po = (folder / "django.po").read_text()
    unescape = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}
    msgids = {
        re.sub(r"\\(.)", lambda m: unescape[str(m[1])], "".join(re.findall(r'"(.*)"', block)))
        for block in re.findall(r'^msgid ((?:".*"\n)+)', po, re.M)
    } - {""}
    assert len(msgids) > 100
    with open(folder / "django.mo", "rb") as compiled:
        catalog = gettext.GNUTranslations(compiled)._catalog  # type: ignore[attr-defined]
    plain = {key if isinstance(key, str) else key[0] for key in catalog}
    assert sorted(msgids - plain) == []


# Dashboard ----------------------------------------------------------------------------------


def test_the_dashboard_shows_cards_chart_top_lists_and_warnings(operator, logs, settings):
    settings.ENCRYPTION_KEY = ""
    page = operator.get("/admin/").content.decode()
    for text in ("Active keys", "Requests per minute", "Error rate, 24 h", "Tokens today",
                 "hourly-chart", "Busiest groups", "ENCRYPTION_KEY is not set"):  # fmt: skip
        assert text in page, text
    assert SECRET not in page
    assert operator.get("/admin/", {"span": "7d", "group": "1"}).status_code == 200


def test_the_dashboard_counts_calls_live_before_their_rows_are_written(operator, monkeypatch):
    import time

    from logs import dashboard, live

    monkeypatch.setattr(live, "counters", live.LiveCounters())
    for _ in range(5):
        live.counters.note(time.time() - 90, True, 10)
    live.counters.note(time.time() - 90, False, 0)
    figures = dashboard.live_figures()
    assert figures["cards"]["rpm"]["value"] == 0.6  # 6 calls in the last 10 minutes
    assert figures["hour"]["ok"] + figures["hour"]["failed"] >= 6 or time.gmtime().tm_min < 2


@pytest.mark.django_db(transaction=True)  # the socket reads the session on another thread
async def test_the_live_dashboard_socket_serves_staff_only(operator):
    from channels.testing import WebsocketCommunicator

    from gptload.asgi import application

    anonymous = WebsocketCommunicator(
        application,
        "/ws/dashboard/",
        headers=[(b"origin", b"http://testserver"), (b"host", b"testserver")],
    )
    connected, _ = await anonymous.connect()
    assert not connected
    session = operator.cookies["sessionid"].value
    staff = WebsocketCommunicator(application, "/ws/dashboard/", headers=[
        (b"origin", b"http://testserver"), (b"host", b"testserver"),
        (b"cookie", f"sessionid={session}".encode())])  # fmt: skip
    connected, _ = await staff.connect()
    assert connected
    message = await staff.receive_json_from(timeout=10)
    assert {"cards", "keys", "hour", "tokens_today"} <= set(message)
    await staff.disconnect()
    # The same session from another site's page, or with no Origin at all: refused.
    for origin in (
        [(b"origin", b"https://evil.example")],
        [(b"origin", b"http://testserver.evil")],
        [],
    ):
        stranger = WebsocketCommunicator(application, "/ws/dashboard/", headers=[
            *origin, (b"host", b"testserver"), (b"cookie", f"sessionid={session}".encode())])  # fmt: skip
        connected, _ = await stranger.connect()
        assert not connected, origin


@pytest.mark.django_db(transaction=True)
async def test_the_dashboard_socket_takes_a_trusted_origin_behind_a_proxy(operator, settings):
    from channels.testing import WebsocketCommunicator

    from gptload.asgi import application

    settings.CSRF_TRUSTED_ORIGINS = ["https://gw.example.com"]
    session = operator.cookies["sessionid"].value
    proxied = WebsocketCommunicator(application, "/ws/dashboard/", headers=[
        (b"origin", b"https://gw.example.com"), (b"host", b"127.0.0.1:3001"),
        (b"cookie", f"sessionid={session}".encode())])  # fmt: skip
    connected, _ = await proxied.connect()
    assert connected
    await proxied.disconnect()
