from __future__ import annotations

import pytest

from gptload.lib.env import ConfigError, Env


def test_it_reads_defaults_when_unset_or_empty():
    env = Env({"PORT": ""})
    assert env.integer("PORT", 3001) == 3001
    assert env.boolean("IS_SLAVE") is False
    assert env.string("HOST", "0.0.0.0") == "0.0.0.0"
    assert env.items("ALLOWED_METHODS", "GET, POST,,") == ["GET", "POST"]
    # Set but empty, as `VAR=` in an env file: the default too (.env.example says so).
    empty = Env({"HOST": "", "ALLOWED_METHODS": " ", "FORWARDED_ALLOW_IPS": "", "TZ": ""})
    assert empty.string("HOST", "0.0.0.0") == "0.0.0.0"
    assert empty.items("ALLOWED_METHODS", "GET,POST") == ["GET", "POST"]
    assert empty.string("FORWARDED_ALLOW_IPS", "127.0.0.1,::1") == "127.0.0.1,::1"
    assert empty.timezone("TZ") == "UTC"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("1", True),
        ("YES", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("No", False),
        ("off", False),
    ],
)
def test_it_reads_every_boolean_spelling(raw, expected):
    assert Env({"IS_SLAVE": raw}).boolean("IS_SLAVE") is expected


def test_it_refuses_a_boolean_it_does_not_know():
    with pytest.raises(ConfigError, match=r"^IS_SLAVE: expected true/false"):
        Env({"IS_SLAVE": "maybe"}).boolean("IS_SLAVE")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("abc", "expected a whole number, got 'abc'"),
        ("0", "must be at least 1, got 0"),
        ("70000", "must be at most 65535, got 70000"),
        ("1.5", "expected a whole number"),
    ],
)
def test_it_refuses_bad_numbers_naming_the_variable(raw, message):
    with pytest.raises(ConfigError) as caught:
        Env({"PORT": raw}).integer("PORT", 3001, minimum=1, maximum=65535)
    assert str(caught.value).startswith("PORT: ")
    assert message in str(caught.value)


def test_it_checks_choices_case_insensitively():
    assert Env({"LOG_FORMAT": "JSON"}).choice("LOG_FORMAT", "text", ("text", "json")) == "json"
    with pytest.raises(ConfigError, match="LOG_FORMAT: expected one of text, json, got 'xml'"):
        Env({"LOG_FORMAT": "xml"}).choice("LOG_FORMAT", "text", ("text", "json"))


def test_it_checks_time_zones():
    assert Env({"TZ": "Asia/Shanghai"}).timezone("TZ") == "Asia/Shanghai"
    assert Env({}).timezone("TZ") == "UTC"
    with pytest.raises(ConfigError, match="TZ: unknown time zone 'Mars/Olympus'"):
        Env({"TZ": "Mars/Olympus"}).timezone("TZ")
