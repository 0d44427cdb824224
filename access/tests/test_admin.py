"""The console's access keys: the list, the form, the secret shown once (on creation and
rotation), usage against the limits, and who may do what."""

from __future__ import annotations

import hashlib
import html
import re
import time

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client

from access.models import AccessKey
from gptload.lib.providers.base import Usage
from keys.models import Group
from logs.writer import LogEntry, write_batch

pytestmark = pytest.mark.django_db
OPENAI = [{"url": "https://api.openai.com", "weight": 1}]
LIST = "/admin/access/accesskey/"
ADD = "/admin/access/accesskey/add/"


@pytest.fixture
def operator(client):
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "pw"))
    return client


@pytest.fixture
def group():
    return Group.objects.create(name="main", channel_type="openai", test_model="m",
                                upstreams=OPENAI)  # fmt: skip


def form(**fields):
    values = {"name": "ci-runner", "enabled": "on", "notes": "", "models": "",
              "rpm": "0", "tpm": "0", "daily_tokens": "0", "monthly_tokens": "0",
              "max_concurrency": "0", "expires_at_0": "", "expires_at_1": ""}  # fmt: skip
    return {**values, **fields}


def shown_secret(page: str) -> str:
    found = re.findall(r"gl-[A-Za-z0-9_-]{43}", html.unescape(page))
    assert found, "no secret on the page"
    return found[0]


def test_creating_a_key_shows_its_secret_once_and_stores_its_hash(operator, group):
    response = operator.post(ADD, form(groups=[group.pk], models="gpt-4o*\n\n claude-* \n",
                                       daily_tokens="1000", rpm="60"), follow=True)  # fmt: skip
    assert response.status_code == 200
    key = AccessKey.objects.get()
    assert response.redirect_chain[-1][0] == f"/admin/access/accesskey/{key.pk}/change/"
    page = response.content.decode()
    secret = shown_secret(page)
    assert "content_copy" in page  # the console's copy button, beside it
    assert key.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert (key.models, key.rpm, key.daily_tokens) == (["gpt-4o*", "claude-*"], 60, 1000)
    assert list(key.groups.all()) == [group]
    stored = " ".join(str(v) for v in AccessKey.objects.values().get().values())
    assert secret not in stored
    # Shown once: the same page again, the list, and the form never show it.
    for url in (f"/admin/access/accesskey/{key.pk}/change/", LIST):
        assert secret not in operator.get(url).content.decode()


def test_the_form_shows_patterns_one_a_line_and_refuses_bad_ones(operator):
    key = AccessKey(name="k", models=["gpt-4o*", "o3"])
    key.issue()
    key.save()
    page = operator.get(f"/admin/access/accesskey/{key.pk}/change/").content.decode()
    assert "gpt-4o*\no3</textarea>" in page
    refused = operator.post(ADD, form(models="x" * 201))
    assert refused.status_code == 200
    assert "longer than 200" in refused.content.decode()
    assert AccessKey.objects.count() == 1


def test_the_list_and_the_page_show_usage_against_the_limits(operator, group):
    key = AccessKey(name="<script>alert(1)</script>", daily_tokens=1000, monthly_tokens=10_000,
                    rpm=60, models=["gpt-4o*"])  # fmt: skip
    key.issue()
    key.save()
    key.groups.set([group])
    write_batch([
        LogEntry(time.time(), group.pk, group.name, None, "", None, "", "", "gpt-4o", status,
                 "", True, 5, "", "/v1/chat/completions", "", False,
                 usage=Usage(600, 350), access_key_id=key.pk)
        for status in (200, 200, 500)
    ])  # fmt: skip
    listing = operator.get(LIST).content.decode()
    assert "<script>alert(1)</script>" not in listing
    assert "&lt;script&gt;" in listing
    assert key.key_hint in listing
    assert "main" in listing
    assert "60 requests/min" in listing
    assert '<span class="text-red-600">2,850</span> / 1,000' in listing  # today, over budget
    page = operator.get(f"/admin/access/accesskey/{key.pk}/change/").content.decode()
    assert "<script>alert(1)</script>" not in page
    assert '<span class="text-red-600">2,850</span> / 1,000' in page
    assert '<span class="">2,850</span> / 10,000' in page  # this month
    assert ">3</td>" in page  # requests
    assert ">1</td>" in page  # failed


def test_rotating_asks_first_then_shows_the_new_secret_once(operator):
    key = AccessKey(name="k")
    old = key.issue()
    key.save()
    url = f"/admin/access/accesskey/{key.pk}/rotate/"
    asked = operator.get(url)
    assert asked.status_code == 200
    assert key.key_hint in asked.content.decode()
    key.refresh_from_db()
    assert key.key_hash == hashlib.sha256(old.encode()).hexdigest()  # a GET changes nothing
    rotated = operator.post(url, follow=True)
    secret = shown_secret(rotated.content.decode())
    key.refresh_from_db()
    assert secret != old
    assert key.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in operator.get(f"/admin/access/accesskey/{key.pk}/change/").content.decode()


def test_bulk_actions_switch_keys_on_and_off(operator):
    keys = []
    for name in ("a", "b"):
        key = AccessKey(name=name)
        key.issue()
        key.save()
        keys.append(key)
    answer = operator.post(LIST, {"action": "disable_selected",
                                  "_selected_action": [k.pk for k in keys]}, follow=True)  # fmt: skip
    assert "2 access keys disabled." in answer.content.decode()
    assert set(AccessKey.objects.values_list("enabled", flat=True)) == {False}
    answer = operator.post(LIST, {"action": "enable_selected",
                                  "_selected_action": [keys[0].pk]}, follow=True)  # fmt: skip
    assert "1 access keys enabled." in answer.content.decode()
    assert AccessKey.objects.get(pk=keys[0].pk).enabled
    answer = operator.post(LIST, {"action": "delete_selected", "post": "yes",
                                  "_selected_action": [k.pk for k in keys]}, follow=True)  # fmt: skip
    assert answer.status_code == 200
    assert not AccessKey.objects.exists()


def test_a_viewer_sees_keys_but_cannot_change_or_rotate_them(client):
    key = AccessKey(name="k")
    key.issue()
    key.save()
    user = User.objects.create_user("viewer", password="pw-0123456789", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__startswith="view_"))
    viewer = Client()
    viewer.force_login(user)
    assert viewer.get(LIST).status_code == 200
    assert viewer.get(f"/admin/access/accesskey/{key.pk}/change/").status_code == 200
    assert viewer.get(ADD).status_code == 403
    assert viewer.post(f"/admin/access/accesskey/{key.pk}/rotate/").status_code == 403
    assert viewer.post(ADD, form()).status_code == 403
    assert AccessKey.objects.count() == 1


def test_the_sidebar_links_to_access_keys(operator):
    assert f'href="{LIST}"' in operator.get("/admin/").content.decode()
