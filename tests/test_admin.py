"""The admin as a superuser sees it: every page answers, and no secret is on any page."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.contrib.auth.models import User
from django.test import override_settings

from keys.models import APIKey, Group, GroupSubGroup
from logs.models import HourlyStat, RequestLog
from settings_app.models import SystemSetting

pytestmark = pytest.mark.django_db
SECRET = "sk-upstream-secret-abcdefghijkl"
PROXY_SECRET = "sk-group-proxy-secret-0123456789"


@pytest.fixture
def world():
    group = Group.objects.create(
        name="openai", channel_type="openai", test_model="gpt-4.1-nano", proxy_keys=PROXY_SECRET,
        upstreams=[{"url": "https://api.openai.com", "weight": 1}], description="<script>alert(1)</script>",
    )  # fmt: skip
    agg = Group.objects.create(
        name="agg", channel_type="openai", group_type="aggregate", test_model="-"
    )
    GroupSubGroup.objects.create(group=agg, sub_group=group, weight=5)
    key = APIKey.build(group, SECRET)
    key.save()
    RequestLog.objects.create(
        timestamp=datetime.now(UTC), group_name="openai", status_code=200, key_value=SECRET
    )
    HourlyStat.objects.create(
        time=datetime.now(UTC).replace(minute=0, second=0, microsecond=0), group_id=group.pk
    )
    return {"group": group, "agg": agg, "key": key}


@pytest.fixture
def admin_client(client):
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "pw"))
    return client


def pages(world):
    group, key = world["group"], world["key"]
    log, stat = RequestLog.objects.get(), HourlyStat.objects.get()
    return [
        "/admin/", "/admin/keys/group/", f"/admin/keys/group/{group.pk}/change/", "/admin/keys/group/add/",
        f"/admin/keys/group/{world['agg'].pk}/change/", "/admin/keys/apikey/", f"/admin/keys/apikey/{key.pk}/change/",
        "/admin/keys/groupsubgroup/", "/admin/logs/requestlog/", f"/admin/logs/requestlog/{log.pk}/change/",
        "/admin/logs/hourlystat/", f"/admin/logs/hourlystat/{stat.pk}/change/",
        "/admin/settings_app/systemsetting/", "/admin/keys/keyjob/", "/admin/auth/user/",
        "/admin/django_celery_beat/periodictask/",
    ]  # fmt: skip


@override_settings(AUTH_KEY="sk-admin-auth-key-abcdefghijklmnop")
def test_every_admin_page_answers_without_showing_a_secret(admin_client, world, settings):
    for url in pages(world):
        response = admin_client.get(url)
        assert response.status_code == 200, url
        html = response.content.decode()
        # A group's own proxy keys are shown on its page (staff read and copy them); the
        # upstream keys and the AUTH_KEY never are.
        shown_keys = url == f"/admin/keys/group/{world['group'].pk}/change/"
        for secret in (SECRET, settings.AUTH_KEY, *(() if shown_keys else (PROXY_SECRET,))):
            assert secret not in html, (url, secret)
        assert "<script>alert(1)</script>" not in html


def test_the_key_list_shows_masked_keys(admin_client, world):
    assert "sk-u…ijkl" in admin_client.get("/admin/keys/apikey/").content.decode()


def test_saving_a_group_keeps_its_proxy_keys_and_config(admin_client, world):
    group = world["group"]
    form = {
        "name": "openai", "display_name": "OpenAI", "description": "", "group_type": "standard",
        "channel_type": "openai", "upstreams": '[{"url": "https://api.openai.com", "weight": 2}]',
        "validation_endpoint": "", "test_model": "gpt-4.1-nano", "param_overrides": "{}", "config": '{"max_retries": 1}',
        "header_rules": "[]", "model_redirect_rules": "{}", "proxy_keys": PROXY_SECRET, "enabled": "on", "sort": "0",
        "members-TOTAL_FORMS": "0", "members-INITIAL_FORMS": "0",
    }  # fmt: skip
    response = admin_client.post(f"/admin/keys/group/{group.pk}/change/", form)
    assert response.status_code == 302, response.content.decode()[:2000]
    group.refresh_from_db()
    assert group.proxy_keys == PROXY_SECRET
    assert group.display_name == "OpenAI"
    assert group.config == {"max_retries": 1}


def test_a_bad_group_is_refused_with_the_reason(admin_client, world):
    form = {
        "name": "Bad Name", "group_type": "standard", "channel_type": "openai",
        "upstreams": '[{"url": "ftp://x", "weight": 1}]', "test_model": "m", "param_overrides": "{}",
        "config": '{"nope": 1}', "header_rules": "[]", "model_redirect_rules": "{}", "sort": "0",
        "members-TOTAL_FORMS": "0", "members-INITIAL_FORMS": "0",
    }  # fmt: skip
    response = admin_client.post("/admin/keys/group/add/", form)
    html = response.content.decode()
    assert response.status_code == 200
    assert "lowercase letters" in html
    assert "not an http:// or https:// URL" in html
    assert "unknown config field" in html
    assert not Group.objects.filter(name="Bad Name").exists()


def test_the_settings_list_shows_defaults_and_the_groups_that_override(admin_client, world):
    Group.objects.create(name="patient", channel_type="openai", config={"max_retries": 9})
    SystemSetting.objects.create(setting_key="max_retries", setting_value="5")
    page = admin_client.get("/admin/settings_app/systemsetting/").content.decode()
    row = page[page.index("max_retries") :].split("</tr>")[0]
    assert ">3<" in row  # the default
    assert "patient" in row
