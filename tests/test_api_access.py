"""Who may do what on /api: the AUTH_KEY everything; a staff session what its Django
permissions allow, area by area, as in the console; failed keys are rate limited."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client

from conftest import ADMIN_KEY
from keys.models import Group
from settings_app.models import SystemSetting

pytestmark = pytest.mark.django_db
SETTINGS_BODY: dict[str, Any] = {"content_type": "application/json", "data": '{"max_retries": 2}'}


def session(*permissions: str, superuser: bool = False) -> Client:
    user = User.objects.create_user(f"u{User.objects.count()}", password="pw-0123456789",
                                    is_staff=True, is_superuser=superuser)  # fmt: skip
    for name in permissions:
        app, codename = name.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app,
                                                         codename=codename))  # fmt: skip
    client = Client()
    client.force_login(user)
    return client


def statuses(client: Client) -> dict[str, int]:
    group = Group.objects.create(
        name="g-access", upstreams=[{"url": "https://u.example", "weight": 1}]
    )
    try:
        return {
            "groups": client.get("/api/groups").status_code,
            "keys": client.get(f"/api/keys?group_id={group.id}").status_code,
            "export": client.get(f"/api/keys/export?group_id={group.id}").status_code,
            "add keys": client.post(
                "/api/keys/add-multiple",
                content_type="application/json",
                data={"group_id": group.id, "keys_text": "k-1"},
            ).status_code,
            "clear keys": client.post(
                "/api/keys/clear-all", content_type="application/json", data={"group_id": group.id}
            ).status_code,
            "logs": client.get("/api/logs").status_code,
            "dashboard": client.get("/api/dashboard/stats").status_code,
            "settings": client.get("/api/settings").status_code,
            "change settings": client.put("/api/settings", **SETTINGS_BODY).status_code,
            "delete group": client.delete(f"/api/groups/{group.id}").status_code,
        }
    finally:
        Group.objects.filter(id=group.id).delete()


def test_a_staff_user_without_permissions_gets_nothing():
    assert set(statuses(session()).values()) == {403}


def test_a_view_only_role_reads_but_never_sees_keys_or_changes_anything():
    viewer = session("keys.view_group", "keys.view_apikey", "logs.view_requestlog",
                     "settings_app.view_systemsetting")  # fmt: skip
    seen = statuses(viewer)
    assert seen == {"groups": 200, "keys": 403, "export": 403, "add keys": 403,
                    "clear keys": 403, "logs": 200, "dashboard": 200, "settings": 403,
                    "change settings": 403, "delete group": 403}  # fmt: skip
    refused = viewer.get("/api/keys?group_id=1").json()
    assert refused["code"] == "FORBIDDEN"
    assert "keys.change_apikey" in refused["message"]


def test_each_change_needs_its_own_permission():
    editor = session("keys.view_group", "keys.change_apikey", "keys.add_apikey",
                     "settings_app.change_systemsetting")  # fmt: skip
    seen = statuses(editor)
    assert (seen["keys"], seen["export"], seen["add keys"]) == (200, 200, 200)
    assert seen["clear keys"] == 403  # deleting keys is keys.delete_apikey
    assert seen["delete group"] == 403
    assert (seen["settings"], seen["change settings"]) == (200, 200)


def test_superusers_and_the_auth_key_get_everything(settings):
    settings.AUTH_KEY = ADMIN_KEY
    assert set(statuses(session(superuser=True)).values()) == {200}
    keyed = Client(headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert set(statuses(keyed).values()) == {200}


def test_no_answer_contains_the_auth_key(settings):
    settings.AUTH_KEY = ADMIN_KEY
    keyed = Client(headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    for path in ("/api/settings", "/api/groups", "/api/groups/config-options",
                 "/api/dashboard/stats", "/api/logs"):  # fmt: skip
        answer = keyed.get(path)
        assert answer.status_code == 200, path
        assert ADMIN_KEY not in answer.content.decode(), path
    assert SystemSetting.objects.effective()["proxy_keys"] != ADMIN_KEY


def test_wrong_keys_are_rate_limited_on_every_door(settings):
    """Ten failures from one address, on the login or any /api path, lock it out for the
    window: the right key too, so that guessing stops paying."""
    settings.AUTH_KEY = ADMIN_KEY
    client = Client(REMOTE_ADDR="198.51.100.7")
    try:
        for attempt in range(5):
            assert client.post("/api/auth/login", {"auth_key": f"guess-{attempt}"},
                               content_type="application/json").status_code == 401  # fmt: skip
        for attempt in range(5):
            wrong = client.get("/api/groups", headers={"Authorization": f"Bearer guess-{attempt}"})
            assert wrong.status_code == 401
        locked = client.post(
            "/api/auth/login", {"auth_key": ADMIN_KEY}, content_type="application/json"
        )
        assert locked.status_code == 429
        assert locked.json()["success"] is False
        right = client.get("/api/groups", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert right.status_code == 429
        assert right.json()["code"] == "TOO_MANY_REQUESTS"
        # Another address is not affected.
        other = Client(REMOTE_ADDR="198.51.100.8")
        assert (
            other.get("/api/groups", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code
            == 200
        )
    finally:
        from django.core.cache import cache

        cache.delete("signin-failures:198.51.100.7")


def test_access_keys_are_their_own_area():
    """A view-only role lists access keys and reads their usage, and changes nothing; each
    change needs its own permission of the access app."""
    from access.models import AccessKey

    key = AccessKey(name="team-a")
    key.issue()
    key.save()
    body: dict[str, Any] = {"content_type": "application/json", "data": '{"name": "team-b"}'}

    def seen(client: Client) -> dict[str, int]:
        return {
            "list": client.get("/api/access-keys").status_code,
            "get": client.get(f"/api/access-keys/{key.pk}").status_code,
            "usage": client.get(f"/api/access-keys/{key.pk}/usage").status_code,
            "create": client.post("/api/access-keys", **body).status_code,
            "update": client.put(f"/api/access-keys/{key.pk}", **body).status_code,
            "rotate": client.post(f"/api/access-keys/{key.pk}/rotate").status_code,
        }

    assert set(seen(session("keys.view_group", "keys.change_apikey")).values()) == {403}
    viewer = session("access.view_accesskey")
    assert seen(viewer) == {"list": 200, "get": 200, "usage": 200, "create": 403,
                            "update": 403, "rotate": 403}  # fmt: skip
    refused = viewer.post("/api/access-keys", **body).json()
    assert refused["code"] == "FORBIDDEN"
    assert "access.add_accesskey" in refused["message"]
    editor = seen(session("access.view_accesskey", "access.change_accesskey"))
    assert (editor["create"], editor["update"], editor["rotate"]) == (403, 200, 200)
    assert session("access.add_accesskey").post("/api/access-keys", **body).status_code == 200
    assert session("access.view_accesskey").delete(f"/api/access-keys/{key.pk}").status_code == 403
    assert (
        session("access.delete_accesskey").delete(f"/api/access-keys/{key.pk}").status_code == 200
    )
