"""`/api/keys/…`: the synchronous key endpoints, through HTTP, with the database after."""

from __future__ import annotations

import codecs
import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import AsyncClient, override_settings

from conftest import ADMIN_KEY
from gptload.lib.crypto import current_cipher
from keys.models import APIKey, Group, KeyJob, KeyStatus
from settings_app.models import ConfigVersion
from tests.fakeprovider import Behaviour, FakeProvider

pytestmark = pytest.mark.django_db
ENCRYPTION = "an-encryption-key-for-tests-0123"


def make_group(name: str = "openai", **fields) -> Group:
    fields.setdefault("upstreams", [{"url": "https://api.openai.com", "weight": 1}])
    return Group.objects.create(name=name, channel_type="openai", test_model="m", **fields)


def add_key(group: Group, secret: str, status: str = KeyStatus.ACTIVE, **fields) -> APIKey:
    key = APIKey.build(group, secret, status=status, **fields)
    key.save()
    return key


def secrets_of(group: Group, **filters) -> set[str]:
    return {key.secret for key in APIKey.objects.filter(group=group, **filters)}


@pytest.fixture
def group() -> Group:
    return make_group()


@pytest.fixture
def aggregate() -> Group:
    return Group.objects.create(name="agg", channel_type="openai", group_type="aggregate")


@pytest.fixture
def version_moves(django_capture_on_commit_callbacks):
    """Asserts, after the block, whether the configuration version moved."""

    class Watch:
        def __init__(self, expected: bool) -> None:
            self.expected = expected

        def __enter__(self) -> None:
            self.before = ConfigVersion.current()
            self.capture = django_capture_on_commit_callbacks(execute=True)
            self.capture.__enter__()

        def __exit__(self, *exc) -> None:
            self.capture.__exit__(*exc)
            assert (ConfigVersion.current() > self.before) is self.expected

    return Watch


# Listing ----------------------------------------------------------------------------------


def test_the_list_shows_plaintext_keys_most_recently_used_first(admin_api, group):
    now = datetime.now(UTC)
    old = add_key(group, "sk-old-0123456789", last_used_at=now - timedelta(hours=1))
    recent = add_key(group, "sk-recent-0123456789", last_used_at=now)
    never = add_key(group, "sk-never-0123456789", notes="spare")
    add_key(make_group("other"), "sk-elsewhere-0123456789")
    page = admin_api.data(admin_api.get(f"/keys?group_id={group.pk}"))
    assert [item["id"] for item in page["items"]] == [recent.pk, old.pk, never.pk]
    assert [item["key_value"] for item in page["items"]] == [
        "sk-recent-0123456789", "sk-old-0123456789", "sk-never-0123456789",
    ]  # fmt: skip
    assert page["pagination"] == {"page": 1, "page_size": 15, "total_items": 3, "total_pages": 1,
                                  "total_exact": True, "next_cursor": None}  # fmt: skip
    item = page["items"][2]
    assert item["notes"] == "spare"
    assert item["status"] == "active"
    assert {"request_count", "failure_count", "consecutive_failures", "cooling_until",
            "last_error", "last_used_at", "created_at", "updated_at"} <= item.keys()  # fmt: skip


def test_the_list_filters_by_status_and_finds_a_key_by_its_exact_value(admin_api, group):
    add_key(group, "sk-alive-0123456789")
    add_key(group, "sk-dead-0123456789", status=KeyStatus.INVALID, last_error="[status 401]")
    invalid = admin_api.data(admin_api.get(f"/keys?group_id={group.pk}&status=invalid"))
    assert [i["key_value"] for i in invalid["items"]] == ["sk-dead-0123456789"]
    assert invalid["items"][0]["last_error"] == "[status 401]"
    found = admin_api.data(
        admin_api.get(f"/keys?group_id={group.pk}&key_value=sk-alive-0123456789")
    )
    assert [i["key_value"] for i in found["items"]] == ["sk-alive-0123456789"]
    partial = admin_api.data(admin_api.get(f"/keys?group_id={group.pk}&key_value=sk-alive"))
    assert partial["items"] == []


def test_the_list_pages(admin_api, group):
    for n in range(5):
        add_key(group, f"sk-page-{n:02d}-0123456789")
    page = admin_api.data(admin_api.get(f"/keys?group_id={group.pk}&page=2&page_size=2"))
    assert [i["key_value"] for i in page["items"]] == [
        "sk-page-02-0123456789",
        "sk-page-01-0123456789",
    ]
    cursor = page["pagination"].pop("next_cursor")
    assert page["pagination"] == {"page": 2, "page_size": 2, "total_items": 5, "total_pages": 3,
                                  "total_exact": True}  # fmt: skip
    # The cursor of page 2 continues where page 3 starts.
    after = admin_api.data(admin_api.get(f"/keys?group_id={group.pk}&page_size=2&cursor={cursor}"))
    assert [i["key_value"] for i in after["items"]] == ["sk-page-00-0123456789"]
    assert (after["pagination"]["page"], after["pagination"]["next_cursor"]) == (None, None)


def test_a_page_past_the_end_is_empty_however_far(admin_api, group):
    add_key(group, "sk-a-0123456789")
    # 2^63 rows in: an OFFSET no database takes (SQLite answered "datatype mismatch").
    page = admin_api.data(admin_api.get(f"/keys?group_id={group.pk}&page={2**63}&page_size=1000"))
    assert page == {"items": [], "pagination": {"page": 2**63, "page_size": 1000,
                                                "total_items": 1, "total_pages": 1,
                                                "total_exact": True, "next_cursor": None}}  # fmt: skip


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("", 400, "VALIDATION_FAILED"),
        ("group_id=999999", 404, "NOT_FOUND"),
        ("group_id={g}&page_size=1001", 400, "VALIDATION_FAILED"),
        ("group_id={g}&page_size=1000000000", 400, "VALIDATION_FAILED"),
        ("group_id={g}&page=0", 400, "VALIDATION_FAILED"),
        ("group_id={g}&page=1&page=2", 400, "BAD_REQUEST"),
        ("group_id={g}&status=broken", 400, "VALIDATION_FAILED"),
    ],
)
def test_the_list_refuses_bad_queries(admin_api, group, query, status, code):
    admin_api.refused(admin_api.get(f"/keys?{query.format(g=group.pk)}"), status, code)


def test_a_key_under_another_encryption_key_is_listed_as_failed_to_decrypt(admin_api, group):
    with override_settings(ENCRYPTION_KEY=ENCRYPTION):
        add_key(group, "sk-sealed-0123456789")
        add_key(group, "sk-open-0123456789")
    with override_settings(ENCRYPTION_KEY="a-different-encryption-key-987"):
        page = admin_api.data(admin_api.get(f"/keys?group_id={group.pk}"))
    assert [i["key_value"] for i in page["items"]] == ["failed-to-decrypt"] * 2
    with override_settings(ENCRYPTION_KEY=ENCRYPTION):
        page = admin_api.data(admin_api.get(f"/keys?group_id={group.pk}"))
    assert [i["key_value"] for i in page["items"]] == ["sk-open-0123456789", "sk-sealed-0123456789"]


# Export ----------------------------------------------------------------------------------


def test_the_export_streams_one_key_per_line_as_a_text_file(admin_api, group):
    add_key(group, "sk-one-0123456789")
    add_key(group, "sk-two-0123456789", status=KeyStatus.INVALID)
    add_key(make_group("other"), "sk-other-0123456789")
    response = admin_api.get(f"/keys/export?group_id={group.pk}")
    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="keys-openai-all.txt"'
    assert b"".join(response.streaming_content) == b"sk-one-0123456789\nsk-two-0123456789\n"
    invalid = admin_api.get(f"/keys/export?group_id={group.pk}&status=invalid")
    assert invalid["Content-Disposition"] == 'attachment; filename="keys-openai-invalid.txt"'
    assert b"".join(invalid.streaming_content) == b"sk-two-0123456789\n"


def test_the_export_covers_more_than_one_batch(admin_api, group, settings):
    from keys import services

    settings.ENCRYPTION_KEY = ""
    services.import_keys(group, [f"sk-bulk-{n:05d}" for n in range(2500)])
    response = admin_api.get(f"/keys/export?group_id={group.pk}&status=active")
    lines = b"".join(response.streaming_content).decode().splitlines()
    assert lines == [f"sk-bulk-{n:05d}" for n in range(2500)]


def test_the_export_refuses_an_unknown_status_or_group(admin_api, group):
    admin_api.refused(
        admin_api.get(f"/keys/export?group_id={group.pk}&status=x"), 400, "VALIDATION_FAILED"
    )
    admin_api.refused(admin_api.get("/keys/export?group_id=999999"), 404, "NOT_FOUND")


@pytest.mark.django_db(transaction=True)
async def test_under_asgi_the_export_streams_asynchronously(settings):
    settings.AUTH_KEY = ADMIN_KEY
    from asgiref.sync import sync_to_async

    group = await sync_to_async(make_group)()
    await sync_to_async(add_key)(group, "sk-async-0123456789")
    response: Any = await AsyncClient().get(
        f"/api/keys/export?group_id={group.pk}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert response.status_code == 200
    assert response.is_async
    chunks = [chunk async for chunk in response.streaming_content]
    assert b"".join(chunks) == b"sk-async-0123456789\n"


# Adding ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "sk-a-0123456789\nsk-b-0123456789\nsk-c-0123456789",
        "\ufeffsk-a-0123456789\r\nsk-b-0123456789\r\n\r\n  sk-c-0123456789  \r\n",
        "sk-a-0123456789, sk-b-0123456789;sk-c-0123456789\tsk-a-0123456789",
        '["sk-a-0123456789", "sk-b-0123456789", " sk-c-0123456789 ", ""]',
    ],
    ids=["lines", "bom-crlf-blanks", "separators-and-a-repeat", "json-array"],
)
def test_keys_are_read_from_lines_separators_or_a_json_array(admin_api, group, text):
    data = admin_api.data(
        admin_api.post("/keys/add-multiple", {"group_id": group.pk, "keys_text": text})
    )
    assert data["added_count"] == 3
    assert data["total_in_group"] == 3
    assert secrets_of(group) == {"sk-a-0123456789", "sk-b-0123456789", "sk-c-0123456789"}
    assert set(APIKey.objects.values_list("status", flat=True)) == {"active"}


def test_keys_already_in_the_group_or_repeated_are_ignored(admin_api, group, version_moves):
    add_key(group, "sk-held-0123456789")
    add_key(make_group("other"), "sk-new-0123456789")  # another group's key is no duplicate
    text = "sk-held-0123456789 sk-new-0123456789 sk-new-0123456789 sk-fresh-0123456789"
    with version_moves(True):
        data = admin_api.data(
            admin_api.post("/keys/add-multiple", {"group_id": group.pk, "keys_text": text})
        )
    assert data == {"added_count": 2, "ignored_count": 2, "total_in_group": 3}
    assert secrets_of(group) == {"sk-held-0123456789", "sk-new-0123456789", "sk-fresh-0123456789"}
    with version_moves(False):
        again = admin_api.post("/keys/add-multiple", {"group_id": group.pk, "keys_text": text})
    assert admin_api.data(again) == {"added_count": 0, "ignored_count": 4, "total_in_group": 3}


@override_settings(ENCRYPTION_KEY=ENCRYPTION)
def test_added_keys_are_encrypted_and_hashed(admin_api, group):
    admin_api.data(
        admin_api.post(
            "/keys/add-multiple", {"group_id": group.pk, "keys_text": "sk-secret-0123456789"}
        )
    )
    key = APIKey.objects.get()
    assert "sk-secret" not in key.key_value
    assert key.key_hash == current_cipher().hash("sk-secret-0123456789")
    assert key.secret == "sk-secret-0123456789"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "No keys found"),
        (" \n ,; ", "No keys found"),
        ('["sk-a-0123456789", 5]', "only strings"),
        ("sk-ok-0123456789 sk-bad\x00key " + "x" * 1001,
         "2 of 3 keys refused: 1 longer than 1000 characters (keys #3); 1 containing control"),
        ("sk-ok-0123456789 sk-zero\u200bwidth", "1 of 2 keys refused"),
        ("k " * 5001, "batch size exceeds the limit of 5000 keys"),
    ],
    ids=["empty", "only-separators", "json-not-strings", "too-long-and-control", "invisible", "too-many"],
)  # fmt: skip
def test_bad_key_text_is_refused_and_nothing_is_stored(admin_api, group, text, words):
    response = admin_api.post("/keys/add-multiple", {"group_id": group.pk, "keys_text": text})
    assert words in admin_api.refused(response, 400, "VALIDATION_FAILED")
    assert not APIKey.objects.exists()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"group_id": 999999, "keys_text": "sk-a"}, 404, "NOT_FOUND"),
        ({"keys_text": "sk-a"}, 400, "VALIDATION_FAILED"),
        ({"group_id": "{g}", "keys_text": "sk-a", "extra": 1}, 400, "VALIDATION_FAILED"),
        ({"group_id": "{g}", "keys_text": 5}, 400, "VALIDATION_FAILED"),
        ({"group_id": True, "keys_text": "sk-a"}, 400, "VALIDATION_FAILED"),  # was group 1
        ({"group_id": "{g}s", "keys_text": "sk-a"}, 400, "VALIDATION_FAILED"),  # the id as text
    ],
)
def test_bad_add_requests_are_refused(admin_api, group, body, status, code):
    ids = {"{g}": group.pk, "{g}s": str(group.pk)}
    body = {k: ids.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    admin_api.refused(admin_api.post("/keys/add-multiple", body), status, code)
    assert not APIKey.objects.exists()


def test_an_aggregate_group_takes_no_keys(admin_api, aggregate):
    response = admin_api.post(
        "/keys/add-multiple", {"group_id": aggregate.pk, "keys_text": "sk-a-0123456789"}
    )
    assert "aggregate group" in admin_api.refused(response, 400, "VALIDATION_FAILED")
    assert not APIKey.objects.exists()


# Malformed and oversized input ---------------------------------------------------------------

FIVE_MB = 5 * 2**20


def post_file(admin_api, group: Group, content: bytes) -> Any:
    upload = SimpleUploadedFile("keys.txt", content)
    return admin_api.client.post(
        "/api/keys/add-async",
        {"group_id": str(group.pk), "file": upload},
        headers=admin_api.headers,
    )


def test_a_multipart_body_without_boundary_is_a_400(admin_api, group):
    # Found by the fuzzer: Django's multipart parser raised, and that was a 500.
    response = admin_api.client.post(
        "/api/keys/add-async", b'{"group_id": 1, "keys_text": "sk-a-0123456789"}',
        content_type="multipart/form-data", headers=admin_api.headers,
    )  # fmt: skip
    assert "boundary" in admin_api.refused(response, 400, "BAD_REQUEST")
    assert not KeyJob.objects.exists()


@pytest.mark.parametrize("path", ["/keys/add-multiple", "/keys/add-async"])
def test_five_megabytes_of_json_are_refused_pointing_to_the_file_upload(admin_api, group, path):
    garbage = random.Random(5).randbytes(FIVE_MB).hex()[:FIVE_MB]
    response = admin_api.post(path, {"group_id": group.pk, "keys_text": garbage})
    assert "multipart `file`" in admin_api.refused(response, 413, "PAYLOAD_TOO_LARGE")
    assert not APIKey.objects.exists()
    assert not KeyJob.objects.exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (random.Random(1).randbytes(FIVE_MB), "not UTF-8"),
        (b"x" * FIVE_MB, "1 of 1 keys refused: 1 longer than 1000 characters"),
        (bytes(range(1, 32)) * (FIVE_MB // 31), "containing control or invisible characters"),
    ],
    ids=["random-bytes", "one-endless-token", "control-characters"],
)
def test_five_megabytes_of_garbage_in_a_file_are_refused(admin_api, group, content, words):
    assert words in admin_api.refused(
        post_file(admin_api, group, content), 400, "VALIDATION_FAILED"
    )
    assert not APIKey.objects.exists()
    assert not KeyJob.objects.exists()


@pytest.mark.parametrize("as_file", [False, True], ids=["json", "file"])
def test_an_async_import_reads_a_bom_crlf_and_blank_lines(admin_api, group, as_file):
    text = "\ufeffsk-a-0123456789\r\n\r\nsk-b-0123456789\r\n  \r\nsk-c-0123456789\r\n"
    if as_file:
        response = post_file(admin_api, group, text.encode())
    else:  # the BOM before the JSON itself, as some editors save it
        body = codecs.BOM_UTF8 + json.dumps({"group_id": group.pk, "keys_text": text}).encode()
        response = admin_api.client.post("/api/keys/add-async", body,
                                         content_type="application/json", headers=admin_api.headers)  # fmt: skip
    assert admin_api.data(response)["total"] == 3
    job = KeyJob.objects.get()
    stored = [current_cipher().decrypt(part.keys) for part in job.parts.order_by("number")]
    assert stored == ["sk-a-0123456789\nsk-b-0123456789\nsk-c-0123456789"]


# Deleting, restoring, clearing ---------------------------------------------------------------


def test_listed_keys_are_deleted_from_the_group_only(admin_api, group, version_moves):
    add_key(group, "sk-a-0123456789")
    add_key(group, "sk-b-0123456789")
    other = make_group("other")
    add_key(other, "sk-a-0123456789")
    with version_moves(True):
        response = admin_api.post("/keys/delete-multiple", {
            "group_id": group.pk, "keys_text": "sk-a-0123456789\nsk-missing-0123456789",
        })  # fmt: skip
    assert admin_api.data(response) == {"deleted_count": 1, "ignored_count": 1, "total_in_group": 1}
    assert secrets_of(group) == {"sk-b-0123456789"}
    assert secrets_of(other) == {"sk-a-0123456789"}


def test_deleting_more_than_5000_keys_at_once_is_refused(admin_api, group):
    add_key(group, "k")
    response = admin_api.post(
        "/keys/delete-multiple", {"group_id": group.pk, "keys_text": "k " * 5001}
    )
    assert "delete-async" in admin_api.refused(response, 400, "VALIDATION_FAILED")
    assert APIKey.objects.count() == 1


def test_listed_invalid_keys_are_restored(admin_api, group, version_moves):
    dead = add_key(group, "sk-dead-0123456789", status=KeyStatus.INVALID, last_error="[status 401]",
                   consecutive_failures=3, failure_count=7)  # fmt: skip
    add_key(group, "sk-off-0123456789", status=KeyStatus.DISABLED)
    add_key(group, "sk-fine-0123456789")
    text = "sk-dead-0123456789 sk-off-0123456789 sk-fine-0123456789 sk-unknown-0123456789"
    with version_moves(True):
        response = admin_api.post(
            "/keys/restore-multiple", {"group_id": group.pk, "keys_text": text}
        )
    assert admin_api.data(response) == {
        "restored_count": 1,
        "ignored_count": 3,
        "total_in_group": 3,
    }
    dead.refresh_from_db()
    assert (dead.status, dead.consecutive_failures, dead.last_error) == ("active", 0, "")
    assert dead.failure_count == 7  # the lifetime count stays
    assert dead.status_changed_at is not None
    assert dead.status_changed_at > datetime.now(UTC) - timedelta(minutes=1)
    assert (
        APIKey.objects.get(key_hash=current_cipher().hash("sk-off-0123456789")).status == "disabled"
    )


def test_every_invalid_key_is_restored(admin_api, group, version_moves):
    for n in range(3):
        add_key(group, f"sk-dead-{n}-0123456789", status=KeyStatus.INVALID, consecutive_failures=5)
    add_key(group, "sk-cool-0123456789", status=KeyStatus.COOLING)
    other = make_group("other")
    add_key(other, "sk-dead-elsewhere-0123456789", status=KeyStatus.INVALID)
    with version_moves(True):
        data = admin_api.data(admin_api.post("/keys/restore-all-invalid", {"group_id": group.pk}))
    assert data == {"message": "3 keys restored", "restored_count": 3}
    assert list(
        APIKey.objects.filter(group=group)
        .values_list("status", flat=True)
        .distinct()
        .order_by("status")
    ) == ["active", "cooling"]
    assert set(
        APIKey.objects.filter(group=group, status="active").values_list(
            "consecutive_failures", flat=True
        )
    ) == {0}
    assert APIKey.objects.get(group=other).status == "invalid"


def test_clearing_invalid_keys_works_through_many_batches(
    admin_api, group, settings, version_moves
):
    from keys import services

    settings.ENCRYPTION_KEY = ""
    services.import_keys(group, [f"sk-{n:05d}" for n in range(2600)])
    ids = list(APIKey.objects.order_by("id").values_list("id", flat=True))
    APIKey.objects.filter(id__in=ids[::2]).update(status=KeyStatus.INVALID)  # 1300, interleaved
    other = make_group("other")
    add_key(other, "sk-other-invalid", status=KeyStatus.INVALID)
    with version_moves(True):
        data = admin_api.data(admin_api.post("/keys/clear-all-invalid", {"group_id": group.pk}))
    assert data == {"message": "1300 invalid keys cleared", "deleted_count": 1300}
    assert set(APIKey.objects.filter(group=group).values_list("id", flat=True)) == set(ids[1::2])
    assert APIKey.objects.filter(group=other).count() == 1


def test_clearing_all_keys_empties_the_group_only(admin_api, group, version_moves):
    add_key(group, "sk-a-0123456789")
    add_key(group, "sk-b-0123456789", status=KeyStatus.DISABLED)
    add_key(make_group("other"), "sk-a-0123456789")
    with version_moves(True):
        data = admin_api.data(admin_api.post("/keys/clear-all", {"group_id": group.pk}))
    assert data == {"message": "2 keys cleared", "deleted_count": 2}
    assert not APIKey.objects.filter(group=group).exists()
    assert APIKey.objects.count() == 1


@pytest.mark.parametrize(
    "path", ["/keys/restore-all-invalid", "/keys/clear-all-invalid", "/keys/clear-all"]
)
def test_group_operations_refuse_an_unknown_group_or_field(admin_api, group, path):
    add_key(group, "sk-a-0123456789", status=KeyStatus.INVALID)
    admin_api.refused(admin_api.post(path, {"group_id": 999999}), 404, "NOT_FOUND")
    admin_api.refused(
        admin_api.post(path, {"group_id": group.pk, "all": True}), 400, "VALIDATION_FAILED"
    )
    admin_api.refused(admin_api.post(path, {}), 400, "VALIDATION_FAILED")
    assert APIKey.objects.get().status == "invalid"


# Testing keys --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fake:
        yield fake


def test_keys_are_tested_against_the_upstream_and_nothing_is_stored(admin_api, provider):
    provider.reset()
    group = make_group(upstreams=[{"url": provider.url, "weight": 1}])
    held = add_key(group, "sk-bad-0123456789abcdef")
    provider.behave("sk-bad-0123456789abcdef", Behaviour(status=401))
    text = "sk-good-0123456789abcdef\nsk-bad-0123456789abcdef"
    data = admin_api.data(
        admin_api.post("/keys/test-multiple", {"group_id": group.pk, "keys_text": text})
    )
    good, bad = data["results"]
    assert (good["key_value"], good["is_valid"], good["error"]) == ("sk-g…cdef", True, "")
    assert (bad["key_value"], bad["is_valid"]) == ("sk-b…cdef", False)
    assert "401" in bad["error"]
    assert isinstance(data["total_duration"], int)
    assert "0123456789abcdef" not in json.dumps(data)
    held.refresh_from_db()
    assert held.status == "active"
    assert sorted(provider.keys_used()) == ["sk-bad-0123456789abcdef", "sk-good-0123456789abcdef"]


def test_testing_too_many_keys_or_keys_of_an_aggregate_is_refused(admin_api, group, aggregate):
    many = " ".join(f"k{n}" for n in range(501))
    response = admin_api.post("/keys/test-multiple", {"group_id": group.pk, "keys_text": many})
    assert "at most 500" in admin_api.refused(response, 400, "VALIDATION_FAILED")
    response = admin_api.post("/keys/test-multiple", {"group_id": aggregate.pk, "keys_text": "k"})
    assert "aggregate" in admin_api.refused(response, 400, "VALIDATION_FAILED")


# One key ------------------------------------------------------------------------------------


def test_one_keys_state_is_shown_with_the_key_masked(admin_api, group):
    until = datetime.now(UTC) + timedelta(minutes=5)
    key = add_key(group, "sk-cooling-0123456789", status=KeyStatus.COOLING, cooling_until=until,
                  last_error="[status 429] slow down", consecutive_failures=2, failure_count=9,
                  request_count=40)  # fmt: skip
    response = admin_api.get(f"/keys/{key.pk}")
    data = admin_api.data(response)
    assert data["masked_key"] == "sk-c…6789"
    assert b"sk-cooling-0123456789" not in response.content
    assert (data["status"], data["last_error"]) == ("cooling", "[status 429] slow down")
    assert abs(datetime.fromisoformat(data["cooling_until"]) - until) < timedelta(milliseconds=1)
    assert (data["consecutive_failures"], data["failure_count"], data["request_count"]) == (
        2,
        9,
        40,
    )
    assert (data["group_id"], data["group_name"]) == (group.pk, "openai")
    admin_api.refused(admin_api.get("/keys/999999"), 404, "NOT_FOUND")


def test_notes_are_set_without_reloading_the_proxy(admin_api, group, version_moves):
    key = add_key(group, "sk-a-0123456789")
    with version_moves(False):
        data = admin_api.data(admin_api.put(f"/keys/{key.pk}/notes", {"notes": "  team A  "}))
    assert data["notes"] == "team A"
    key.refresh_from_db()
    assert key.notes == "team A"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"notes": "x" * 256}, 400, "VALIDATION_FAILED"),
        ({"notes": "x", "status": "active"}, 400, "VALIDATION_FAILED"),
        ({}, 400, "VALIDATION_FAILED"),
    ],
)
def test_bad_notes_are_refused(admin_api, group, body, status, code):
    key = add_key(group, "sk-a-0123456789", notes="kept")
    admin_api.refused(admin_api.put(f"/keys/{key.pk}/notes", body), status, code)
    key.refresh_from_db()
    assert key.notes == "kept"
    admin_api.refused(admin_api.put("/keys/999999/notes", {"notes": "x"}), 404, "NOT_FOUND")


def test_an_operator_disables_and_enables_a_key(admin_api, group, version_moves):
    key = add_key(group, "sk-a-0123456789", status=KeyStatus.INVALID, last_error="[status 401]",
                  consecutive_failures=4)  # fmt: skip
    with version_moves(True):
        data = admin_api.data(admin_api.put(f"/keys/{key.pk}/status", {"status": "disabled"}))
    assert data["status"] == "disabled"
    key.refresh_from_db()
    assert key.status == "disabled"
    with version_moves(True):
        data = admin_api.data(admin_api.put(f"/keys/{key.pk}/status", {"status": "active"}))
    key.refresh_from_db()
    assert (key.status, key.consecutive_failures, key.last_error) == ("active", 0, "")
    assert data["status"] == "active"


@pytest.mark.parametrize("status", ["invalid", "cooling", "", None])
def test_only_active_or_disabled_can_be_set(admin_api, group, status):
    key = add_key(group, "sk-a-0123456789")
    admin_api.refused(
        admin_api.put(f"/keys/{key.pk}/status", {"status": status}), 400, "VALIDATION_FAILED"
    )
    assert APIKey.objects.get().status == "active"


def test_the_key_endpoints_are_documented(client):
    paths = client.get("/api/openapi.json").json()["paths"]
    for path in ["/api/keys", "/api/keys/export", "/api/keys/add-multiple", "/api/keys/add-async",
                 "/api/keys/delete-multiple", "/api/keys/delete-async", "/api/keys/restore-multiple",
                 "/api/keys/restore-all-invalid", "/api/keys/clear-all-invalid", "/api/keys/clear-all",
                 "/api/keys/validate-group", "/api/keys/test-multiple", "/api/keys/{key_id}",
                 "/api/keys/{key_id}/notes", "/api/keys/{key_id}/status", "/api/tasks/status",
                 "/api/tasks/{job_id}/cancel"]:  # fmt: skip
        assert path in paths, path
    add_async = paths["/api/keys/add-async"]["post"]
    assert set(add_async["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert add_async["description"]
