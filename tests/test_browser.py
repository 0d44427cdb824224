"""The console in a real browser (Debian's Chromium, driven by Playwright), against a real
server with its embedded worker, as an operator uses it on a first day: sign in with the
AUTH_KEY, make a group, paste 1,000 keys and watch the job finish, find a key by value,
validate it, watch the dashboard move while calls run, filter the logs, change a setting
and see it in force, and switch the language. Screenshots land in the test's temp dir."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ADMIN_KEY, ON_MYSQL, free_port
from tests.fakeprovider import FakeProvider

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed"),
    # The browser checks the pages and their scripts, the same on every store; what differs
    # behind them (Redis channel layer, broker, sessions) is checked by test_console.py and
    # test_serve.py on both passes. Once is enough for a browser's time.
    pytest.mark.skipif(ON_MYSQL, reason="the browser runs on the SQLite pass"),
]
SHOTS: dict[str, Path] = {}  # where shot() saves: $SCREENSHOTS, or the test's temp dir
CHAT: Any = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider


@pytest.fixture(scope="module")
def server(store_env: dict[str, str]) -> Iterator[Any]:
    """gptload with its embedded worker (imports and validations run as jobs)."""
    from conftest import Server

    port = free_port()
    command = [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--worker"]  # fmt: skip
    running = Server(command, {**store_env, "AUTH_KEY": ADMIN_KEY}, port)
    running.wait_ready()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def page(server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    SHOTS["folder"] = Path(os.environ.get("SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 900}, locale="en-US",
                                      base_url=server.url)  # fmt: skip
        context.grant_permissions(["clipboard-read", "clipboard-write"])
        page = context.new_page()
        page.set_default_timeout(20_000)
        yield page
        browser.close()


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(SHOTS["folder"] / f"{name}.png"), full_page=True)


def test_an_operators_first_day(page: Any, server: Any, fake: FakeProvider) -> None:
    name = f"main-{uuid.uuid4().hex[:6]}"
    # Sign in with the AUTH_KEY alone.
    page.goto("/admin/login/")
    page.fill("input[name=password]", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_selector("#dashboard")
    shot(page, "dashboard")

    # A group: name, channel, an upstream row, a generated proxy key.
    page.goto("/admin/keys/group/add/")
    page.fill("input[name=name]", name)
    # Picking a channel fills in its default upstream and test model; another channel swaps them.
    upstream = page.locator('[data-rows-for="upstreams"] input[type="url"]')
    page.select_option("select[name=channel_type]", "gemini")
    assert page.input_value("input[name=test_model]") == "gemini-2.0-flash-lite"
    assert upstream.input_value() == "https://generativelanguage.googleapis.com"
    page.select_option("select[name=channel_type]", "openai")
    assert page.input_value("input[name=test_model]") == "gpt-4.1-nano"
    assert upstream.input_value() == "https://api.openai.com"
    page.fill("input[name=test_model]", "gpt-4o-mini")
    upstream.fill(fake.url)
    page.get_by_role("button", name=re.compile("Add a generated key")).click()
    proxy_key = page.input_value("textarea[name=proxy_keys]")
    assert re.fullmatch(r"sk-[A-Za-z0-9]{48}", proxy_key)
    page.get_by_role("button", name=re.compile("Copy")).click()
    assert page.evaluate("navigator.clipboard.readText()") == proxy_key
    page.click("button[name=_continue]")
    page.wait_for_selector("text=was added successfully")
    group_url = page.url

    # Paste 1,000 keys; the job's page follows it to the end.
    page.get_by_role("link", name=re.compile("Import keys")).click()
    keys = [f"sk-bulk-{n:04d}-{uuid.uuid4().hex}" for n in range(1000)]
    page.fill("textarea[name=text]", "\n".join(keys))
    page.get_by_role("button", name="Import").click()
    page.wait_for_url(re.compile(r"/admin/keys/keyjob/\d+/change/"))
    # Followed live until the job ends; the page then shows itself again with the result.
    page.wait_for_selector("[data-job-finished]", timeout=60_000)
    assert "succeeded" in page.inner_text("#job-label")
    assert "1000 / 1000" in page.inner_text("#job-label")
    shot(page, "import-job")

    # Find one key by its value, and validate it (the fake provider's model list).
    page.goto("/admin/keys/apikey/")
    page.fill("input[name=q]", keys[123])
    with page.expect_navigation():
        page.keyboard.press("Enter")
    rows = page.locator("#result_list tbody tr")
    assert rows.count() == 1
    rows.first.locator("input.action-select").check()
    page.select_option("select[name=action]", "validate_selected")
    page.get_by_role("button", name=re.compile("Run")).click()
    page.wait_for_selector("text=validating 1 keys")
    assert fake.wait_until(lambda: any(r.key == keys[123] for r in fake.requests), timeout=15)

    # A setting changed on the settings page is in force on the proxy at once.
    page.goto("/admin/settings_app/systemsetting/")
    new_global = f"sk-global-{uuid.uuid4().hex}"
    page.fill("input[name=proxy_keys]", new_global)
    page.fill("input[name=request_log_write_interval_minutes]", "0")  # logs written at once
    page.get_by_role("button", name="Save settings").click()
    page.wait_for_selector("text=Settings saved")
    answer = httpx.post(f"{server.url}/proxy/{name}/v1/chat/completions", json=CHAT,
                        headers={"Authorization": f"Bearer {new_global}"})  # fmt: skip
    assert answer.status_code == 200

    # The dashboard moves while calls run, without a reload.
    page.goto("/admin/")
    before = page.inner_text('[data-live="cards.request_count.value"]')
    for _ in range(6):
        answer = httpx.post(f"{server.url}/proxy/{name}/v1/chat/completions", json=CHAT,
                            headers={"Authorization": f"Bearer {proxy_key}"})  # fmt: skip
        assert answer.status_code == 200
    page.wait_for_function(
        "([sel, before]) => document.querySelector(sel).textContent !== before",
        arg=['[data-live="cards.request_count.value"]', before],
        timeout=15_000,
    )

    # The logs, filtered by status.
    httpx.post(f"{server.url}/proxy/{name}/v1/chat/completions", json=CHAT,
               headers={"Authorization": "Bearer sk-wrong-proxy-key-0123456789"})  # fmt: skip
    statuses = reload_until(page, "/admin/logs/requestlog/?status=200", 'td[data-label="Status"]')
    assert statuses
    assert {text.strip() for text in statuses} == {"200"}

    # The same through the filter panel, with a time range: the last hour, then yesterday.
    def filter_logs(since: datetime, until: datetime) -> list[str]:
        page.goto("/admin/logs/requestlog/")
        page.locator("a", has_text="Filters").first.click()
        page.fill("input[name=status]", "200")
        for end, when in (("from", since), ("to", until)):
            page.fill(f"input[name=timestamp_{end}_0]", when.strftime("%Y-%m-%d"))
            page.fill(f"input[name=timestamp_{end}_1]", when.strftime("%H:%M:%S"))
        page.get_by_role("button", name=re.compile("Apply Filters")).click()
        page.wait_for_load_state("networkidle")
        assert "timestamp_from_0" in page.url
        return [text.strip() for text in page.locator('td[data-label="Status"]').all_inner_texts()]

    now = datetime.now(UTC)
    assert set(filter_logs(now - timedelta(hours=1), now + timedelta(minutes=5))) == {"200"}
    shot(page, "logs")
    assert filter_logs(now - timedelta(days=2), now - timedelta(days=1)) == []

    # 简体中文, and back.
    page.goto(group_url)
    switch_language(page, "zh-hans")
    assert "仪表盘" in page.inner_text("nav") or "仪表板" in page.inner_text("nav")
    shot(page, "group-zh")
    switch_language(page, "en")
    assert "Dashboard" in page.inner_text("nav")


def test_an_access_keys_secret_is_shown_once_and_copied(page: Any, server: Any) -> None:
    """Made on its form; its secret shown once after the save, beside a working copy
    button, and never again; its page shows its usage against its limits."""
    page.goto("/admin/login/")
    if "/login/" in page.url:
        page.fill("input[name=password]", ADMIN_KEY)
        page.click("button[type=submit]")
        page.wait_for_selector("#dashboard")
    page.goto("/admin/access/accesskey/add/")
    page.fill("input[name=name]", "ci-runner")
    page.fill("textarea[name=models]", "gpt-4o*\nclaude-*")
    page.fill("input[name=daily_tokens]", "100000")
    page.click("button[name=_save]")
    page.wait_for_selector("text=Copy it now")
    secret = page.locator("code.select-all").inner_text()
    assert re.fullmatch(r"gl-[A-Za-z0-9_-]{43}", secret)
    page.locator('button[title="Copy"][data-copy]').first.click()
    assert page.evaluate("navigator.clipboard.readText()") == secret
    assert "0 / 100,000" in page.inner_text("body")  # usage today against the daily limit
    shot(page, "access-key")
    page.reload()
    assert secret not in page.content()
    page.goto("/admin/access/accesskey/")
    assert "ci-runner" in page.inner_text("#result_list")
    assert secret not in page.content()
    shot(page, "access-keys")


def reload_until(page: Any, url: str, selector: str, within: float = 15.0) -> list[str]:
    """The texts of `selector` once the page shows some (logs are written behind the calls)."""
    deadline = time.monotonic() + within
    while True:
        page.goto(url)
        texts = page.locator(selector).all_inner_texts()
        if texts or time.monotonic() > deadline:
            return texts
        time.sleep(0.5)


def switch_language(page: Any, code: str) -> None:
    # Wait for the navigation the submit starts: the page before it is idle already.
    with page.expect_navigation():
        page.locator(f'form:has(input[name="language"][value="{code}"])').first.evaluate(
            "f => f.submit()"
        )
    page.wait_for_load_state("networkidle")
