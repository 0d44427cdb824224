from __future__ import annotations

import pytest

from gptload.lib.urls import is_http_url


@pytest.mark.parametrize(
    "text",
    [
        "http://example.com",
        "https://api.openai.com/v1/",
        "http://127.0.0.1:3001",
        "https://[::1]:8443/path?q=1",
        "HTTPS://Example.COM",
    ],
)
def test_it_accepts_http_and_https_urls_with_a_host(text):
    assert is_http_url(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "api.openai.com",
        "/v1/chat/completions",
        "ftp://files.example",
        "socks5://proxy.example:1080",
        "http://",
        "http://:8080",
        "http://example.com:99999",
        "http://example.com:port",
        "http://[::1",
    ],
)
def test_it_refuses_anything_else_without_raising(text):
    assert not is_http_url(text)
