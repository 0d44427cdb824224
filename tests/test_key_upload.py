"""A key file uploaded to a served gptload, read as a stream: bigger than a read chunk and
than a stored part, with what real files hold (a BOM, CRLF, blank lines, repeats, a key
cut by a chunk's end), imported whole by the worker the server runs beside it."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx

from conftest import ADMIN_KEY
from keys import jobs, services

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def key_file() -> tuple[bytes, set[str], int]:
    """(the file, its distinct keys, how many keys it lists)."""
    keys = [f"sk-up-{n:06d}-abcdefghijklmnopqrstuvwxyz012345" for n in range(jobs.PART_KEYS + 500)]
    listed = keys + keys[:40]  # repeats, the second time further down
    body = "\r\n".join(listed[:100]) + "\r\n\r\n  \r\n" + ",".join(listed[100:])
    for pad in range(30, 90):  # a first key of a length that puts the chunk's end inside a key
        first = "sk-lead-" + "x" * pad
        text = ("\ufeff" + first + "\r\n" + body + "\r\n").encode()
        edge = services.READ_CHUNK
        if re.fullmatch(rb"[a-z0-9-]{6}", text[edge - 3 : edge + 3]):
            return text, {first, *keys}, len(listed) + 1
    raise AssertionError("no padding puts a key across the chunk's end")


def wait_for(server: Any, group_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/api/tasks/status?group_id={group_id}",
                           headers=ADMIN).json()["data"]  # fmt: skip
        if status["status"] in ("succeeded", "failed"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"the import did not finish: {status}")


def test_a_key_file_is_streamed_into_a_job_and_imported_whole_or_refused_whole(serve):
    content, distinct, listed = key_file()
    assert len(content) > 5 * services.READ_CHUNK
    server = serve(env={"AUTH_KEY": ADMIN_KEY}, worker=True)
    server.wait_ready()
    group = httpx.post(f"{server.url}/api/groups", headers=ADMIN, json={
        "name": f"up{time.monotonic_ns()}", "channel_type": "openai", "test_model": "m",
        "upstreams": [{"url": "https://api.openai.com", "weight": 1}]}).json()["data"]  # fmt: skip
    started = httpx.post(f"{server.url}/api/keys/add-async", headers=ADMIN, timeout=60,
                         data={"group_id": str(group["id"])},
                         files={"file": ("keys.txt", content, "text/plain")})  # fmt: skip
    assert started.status_code == 200, started.text
    assert started.json()["data"]["total"] == listed
    status = wait_for(server, group["id"])
    assert status["status"] == "succeeded", status
    assert status["result"] == {"added_count": len(distinct), "ignored_count": listed - len(distinct),
                                "total_in_group": len(distinct)}  # fmt: skip
    exported = httpx.get(f"{server.url}/api/keys/export?group_id={group['id']}", headers=ADMIN,
                         timeout=60).text  # fmt: skip
    assert set(exported.split()) == distinct
    # A malformed key after a part's worth of good ones: refused, nothing left behind.
    bad = "".join(f"sk-fine-{n:06d}-0123\n" for n in range(jobs.PART_KEYS + 10)) + "sk-\x07-0123\n"
    refused = httpx.post(f"{server.url}/api/keys/add-async", headers=ADMIN, timeout=60,
                         data={"group_id": str(group["id"])},
                         files={"file": ("keys.txt", bad.encode(), "text/plain")})  # fmt: skip
    assert refused.status_code == 400
    assert f"1 of {jobs.PART_KEYS + 11} keys refused" in refused.json()["message"]
    latest = httpx.get(f"{server.url}/api/tasks/status?group_id={group['id']}",
                       headers=ADMIN).json()["data"]  # fmt: skip
    assert latest["id"] == status["id"]  # no new job (nor its parts)


def test_the_reader_joins_what_chunks_cut_and_reads_a_json_array_whole():
    reader = services.KeyReader()
    pieces = services.decoded([b"\xef\xbb\xbfsk-a\xc3", b"\xa9b\r", b"\nsk-c,,sk-", b"d\n"])
    keys = [key for piece in pieces for key in reader.feed(piece)] + reader.close()
    assert keys == ["sk-a\u00e9b", "sk-c", "sk-d"]
    reader = services.KeyReader()
    keys = reader.feed(' ["sk-x", " sk') + reader.feed('-y "]') + reader.close()
    assert keys == ["sk-x", "sk-y"]
