"""Cursor paging of the long lists (keys, request logs) in the API and the console: every
row once across pages while rows come and go, the same order as paging by number."""

from __future__ import annotations

import html
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.test import Client

from gptload.lib.paging import Keyset
from keys.models import APIKey, Group
from logs.models import RequestLog

pytestmark = pytest.mark.django_db
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def group():
    return Group.objects.create(name="paged", channel_type="openai", test_model="m",
                                upstreams=[{"url": "https://api.openai.com", "weight": 1}])  # fmt: skip


def add_keys(group: Group, names: list[str], used: datetime | None = None) -> list[int]:
    ids = []
    for name in names:
        key = APIKey.build(group, f"sk-{name}-0123456789abcdef", last_used_at=used)
        key.save()
        ids.append(key.pk)
    return ids


def add_logs(count: int, start: datetime, prefix: str) -> list[str]:
    rows = [RequestLog(id=uuid.uuid5(uuid.NAMESPACE_URL, f"{prefix}-{n}"), status_code=200,
                       timestamp=start - timedelta(seconds=n // 3), group_name="paged")
            for n in range(count)]  # fmt: skip
    RequestLog.objects.bulk_create(rows)
    return [str(row.id) for row in rows]


def walk(admin_api, path: str, between) -> list:
    """Every item of a walk by cursor, 4 a page, calling `between(page number)` after
    each page (rows written or deleted meanwhile)."""
    seen, cursor, number = [], "", 0
    while True:
        page = admin_api.data(admin_api.get(f"{path}page_size=4&cursor={cursor}"))
        assert page["pagination"]["page"] is None
        seen += [item["id"] for item in page["items"]]
        cursor, number = page["pagination"]["next_cursor"], number + 1
        if cursor is None:
            return seen
        between(number)


def test_a_key_walk_by_cursor_returns_every_key_once_while_keys_come_and_go(admin_api, group):
    used = add_keys(group, [f"used-{n}" for n in range(5)], used=NOW)  # five tied
    older = add_keys(group, [f"older-{n}" for n in range(3)], used=NOW - timedelta(hours=1))
    never = add_keys(group, [f"never-{n}" for n in range(7)])  # NULL: last, by id
    order = [
        *sorted(used, reverse=True),
        *sorted(older, reverse=True),
        *sorted(never, reverse=True),
    ]
    gone: list[int] = []

    def between(number: int) -> None:
        add_keys(group, [f"new-{number}"])  # never used: first of the NULL part
        doomed = order[-number]  # one not shown yet, from the end
        APIKey.objects.filter(pk=doomed).delete()
        gone.append(doomed)

    seen = walk(admin_api, f"/keys?group_id={group.pk}&", between)
    assert len(seen) == len(set(seen))
    assert [pk for pk in seen if pk in order] == [pk for pk in order if pk not in gone]


def test_a_log_walk_by_cursor_returns_every_row_once_while_rows_come_and_go(admin_api):
    first = add_logs(30, NOW, "first")  # three rows a second: ties, broken by id
    everything = admin_api.data(admin_api.get("/logs?page_size=1000"))["items"]
    order = [row["id"] for row in everything]
    assert sorted(order) == sorted(first)
    gone: list[str] = []

    def between(number: int) -> None:
        add_logs(2, NOW + timedelta(minutes=number), f"new-{number}")  # newer: behind the walk
        RequestLog.objects.filter(pk=order[-number]).delete()
        gone.append(order[-number])

    seen = walk(admin_api, "/logs?", between)
    assert seen == [i for i in order if i not in gone]


def test_pages_by_number_and_by_cursor_agree_and_each_page_points_to_the_next(admin_api, group):
    add_keys(group, [f"k-{n}" for n in range(4)], used=NOW)
    add_keys(group, [f"n-{n}" for n in range(5)])
    by_page, cursors, number = [], [], 1
    while True:
        page = admin_api.data(admin_api.get(f"/keys?group_id={group.pk}&page={number}&page_size=2"))
        if not page["items"]:
            break
        by_page += [item["id"] for item in page["items"]]
        cursors.append(page["pagination"]["next_cursor"])
        assert page["pagination"]["total_items"] == 9
        number += 1
    assert cursors[-1] is None  # the last page says so
    for n, cursor in enumerate(cursors[:-1], start=1):
        page = admin_api.data(
            admin_api.get(f"/keys?group_id={group.pk}&page_size=2&cursor={cursor}")
        )
        assert [item["id"] for item in page["items"]] == by_page[2 * n : 2 * n + 2]


def test_a_count_stops_early_on_a_long_list_and_says_so(admin_api, group, monkeypatch):
    monkeypatch.setattr("gptload.lib.api.COUNT_AHEAD", 3)
    add_keys(group, [f"k-{n}" for n in range(9)])
    page = admin_api.data(admin_api.get(f"/keys?group_id={group.pk}&page=2&page_size=2"))
    assert page["pagination"]["total_items"] == 2 + 2 + 3  # the page's start, the page, 3 more
    assert page["pagination"]["total_exact"] is False
    last = admin_api.data(admin_api.get(f"/keys?group_id={group.pk}&page=4&page_size=2"))
    assert (last["pagination"]["total_items"], last["pagination"]["total_exact"]) == (9, True)


@pytest.mark.parametrize("cursor", ["nonsense", "W10", "WyJ4IiwgIjEiXQ", "x" * 501])
def test_a_cursor_not_made_by_the_list_is_refused(admin_api, group, cursor):
    response = admin_api.get(f"/keys?group_id={group.pk}&cursor={cursor}")
    admin_api.refused(response, 400, "VALIDATION_FAILED" if len(cursor) > 500 else "BAD_REQUEST")


# The console -------------------------------------------------------------------------------


@pytest.fixture
def operator(settings):
    settings.AUTH_KEY = "sk-console-admin-key-0123456789abcdef"
    client = Client()
    client.post("/admin/login/", {"username": "", "password": settings.AUTH_KEY})
    return client


def link(page: str, label: str) -> str | None:
    found = re.search(rf'<a\s+href="([^"]*)"[^>]*>\s*{label}\s*</a>', page)
    return html.unescape(found.group(1)) if found else None


def must_link(page: str, label: str) -> str:
    href = link(page, label)
    assert href is not None, f"no {label!r} link on the page"
    return href


def log_ids(text: str) -> list[str]:
    return list(
        dict.fromkeys(re.findall(r"/admin/logs/requestlog/([0-9a-f-]{32,36})/change/", text))
    )


def test_the_log_lists_next_link_seeks_and_covers_every_row_once(operator, monkeypatch):
    from logs.admin import RequestLogAdmin

    monkeypatch.setattr(RequestLogAdmin, "list_per_page", 4)
    rows = add_logs(14, NOW, "console")
    base = "/admin/logs/requestlog/"
    text = operator.get(base + "?status=200").content.decode()
    pages = [log_ids(text)]
    while href := link(text, "Next"):
        assert "after=" in href
        assert "status=200" in href  # the filter stays
        text = operator.get(base + href).content.decode()
        pages.append(log_ids(text))
        if len(pages) == 2:  # a new row meanwhile shifts nothing
            RequestLog.objects.bulk_create(
                [RequestLog(status_code=200, timestamp=NOW + timedelta(1))]
            )
    shown = [row for page in pages for row in page]
    assert sorted(shown) == sorted(str(uuid.UUID(row)) for row in rows)
    # A cursor that is not one falls back to the page by number.
    by_number = log_ids(operator.get(base + "?status=200&p=3").content.decode())
    assert log_ids(operator.get(base + "?status=200&p=3&after=bad").content.decode()) == by_number
    assert len(by_number) == 4


def test_the_key_lists_previous_link_comes_back_to_the_same_rows(operator, group, monkeypatch):
    from keys.admin import APIKeyAdmin

    monkeypatch.setattr(APIKeyAdmin, "list_per_page", 3)
    add_keys(group, [f"u-{n}" for n in range(4)], used=NOW)
    add_keys(group, [f"n-{n}" for n in range(6)])

    def ids(text: str) -> list[str]:
        return list(
            dict.fromkeys(re.findall(r'data-reveal="/admin/keys/apikey/(\d+)/reveal/"', text))
        )

    first = operator.get("/admin/keys/apikey/").content.decode()
    second = operator.get("/admin/keys/apikey/" + must_link(first, "Next")).content.decode()
    third = operator.get("/admin/keys/apikey/" + must_link(second, "Next")).content.decode()
    back = operator.get("/admin/keys/apikey/" + must_link(third, "Previous")).content.decode()
    assert ids(back) == ids(second)
    assert len(set(ids(first) + ids(second) + ids(third))) == 9


def test_the_keyset_knows_a_list_sorted_another_way():
    keyset = Keyset("last_used_at")
    assert keyset.serves(APIKey.objects.order_by("-last_used_at", "-id"))
    assert not keyset.serves(APIKey.objects.order_by("status", "-id"))
