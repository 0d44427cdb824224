"""The typed registry of hot-reloadable settings: GPT-Load's 18 (same keys and meanings),
and gptload's own per-key limits (`key_rpm`, `key_rpd`, `key_max_concurrency`,
`key_wait_seconds`).

Effective value of a setting for a group: the group's override (`Group.config`) if it has
one, else the system value stored in `SystemSetting`, else the default here. Every writer
(admin form, REST API, group config) validates through `Setting.parse`, so a bad value is
refused with a reason before it is stored.

Names, descriptions and categories are English text marked for translation and shown
through `gettext` (console and `/api/settings`), so that what is stored (a setting row's
description) stays English; refusals are worded in the language active when raised.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings as django_settings
from django.utils.translation import gettext as _
from django.utils.translation import gettext_noop

from gptload.lib.urls import is_http_url


class SettingError(ValueError):
    """A setting value is refused; the message says which setting and why."""


BASIC = gettext_noop("Basic")
REQUEST = gettext_noop("Request settings")
KEYS = gettext_noop("Key configuration")
LIMITS = gettext_noop("Key limits")
STATUS_RANGE = re.compile(r"^(\d{3})(?:-(\d{3}))?$")
# No count or duration needs more; beyond it `timedelta` and the schedulers overflow.
MAXIMUM = 1_000_000


def parse_status_codes(spec: str) -> frozenset[int]:
    """HTTP statuses from a spec such as `401-403,408,429,500-599`; "" is no status."""
    codes: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        match = STATUS_RANGE.match(part.replace(" ", ""))
        if not match:
            raise SettingError(
                _("%(value)s is not a status code or a range like 500-599") % {"value": repr(part)}
            )
        low, high = int(match[1]), int(match[2] or match[1])
        if not (100 <= low <= high <= 999):
            raise SettingError(
                _("%(value)s must lie within 100-999, low to high") % {"value": repr(part)}
            )
        codes.update(range(low, high + 1))
    return frozenset(codes)


def _status_codes(value: str) -> str:
    parse_status_codes(value)
    return ",".join(p.strip().replace(" ", "") for p in value.split(",") if p.strip())


def _key_list(value: str) -> str:
    keys = dict.fromkeys(k.strip() for k in value.split(",") if k.strip())
    return ",".join(keys)


def _http_url(value: str) -> str:
    if not is_http_url(value):
        raise SettingError(
            _("%(value)s is not an http:// or https:// URL") % {"value": repr(value)}
        )
    return value.rstrip("/")


def _proxy_url(value: str) -> str:
    if not value:
        return ""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https", "socks5", "socks5h") or not parts.hostname:
        raise SettingError(
            _("%(value)s is not an http://, https:// or socks5:// proxy URL")
            % {"value": repr(value)}
        )
    return value


def _app_url_default() -> str:
    if django_settings.PUBLIC_URL:
        return str(django_settings.PUBLIC_URL)
    host = (
        django_settings.HOST if django_settings.HOST not in ("", "0.0.0.0", "::") else "localhost"
    )
    return f"http://{host}:{django_settings.PORT}"


def new_proxy_key() -> str:
    """A strong random proxy key as GPT-Load's generator makes them (`sk-` and 48
    characters), for the global keys at first boot and the console's generator."""
    return "sk-" + secrets.token_urlsafe(36)[:48]


@dataclass(frozen=True)
class Setting:
    key: str
    kind: type
    default: Any
    name: str  # name, description, category: shown through gettext
    description: str
    category: str
    minimum: int | None = None
    maximum: int = MAXIMUM
    group_overridable: bool = False
    required: bool = False
    normalize: Callable[[str], str] | None = field(default=None, compare=False)

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def parse(self, raw: Any) -> Any:
        """The typed value of `raw` (JSON value or stored text); raises `SettingError`."""
        try:
            value = self._convert(raw)
        except SettingError as exc:
            raise SettingError(f"{self.key}: {exc}") from None
        return value

    def _convert(self, raw: Any) -> Any:
        if self.kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise SettingError(expected_bool(raw))
        if self.kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise SettingError(expected_int(raw))
            try:
                number = int(raw) if not isinstance(raw, str) else int(raw.strip())
            except (TypeError, ValueError):
                raise SettingError(expected_int(raw)) from None
            if self.minimum is not None and number < self.minimum:
                raise SettingError(
                    _("must be at least %(minimum)d, got %(value)d")
                    % {"minimum": self.minimum, "value": number}
                )
            if number > self.maximum:
                raise SettingError(
                    _("must be at most %(maximum)d, got %(value)d")
                    % {"maximum": self.maximum, "value": number}
                )
            return number
        if not isinstance(raw, str):
            raise SettingError(expected_text(raw))
        text = raw.strip()
        if self.normalize is not None:
            text = self.normalize(text)
        if self.required and not text:
            raise SettingError(_("must not be empty"))
        return text

    def serialize(self, value: Any) -> str:
        if self.kind is bool:
            return "true" if value else "false"
        return str(value)


def expected_bool(raw: Any) -> str:
    return _("expected true or false, got %(value)s") % {"value": repr(raw)}


def expected_int(raw: Any) -> str:
    return _("expected a whole number, got %(value)s") % {"value": repr(raw)}


def expected_text(raw: Any) -> str:
    return _("expected text, got %(value)s") % {"value": repr(raw)}


def unknown_setting(key: str) -> str:
    return _("unknown setting %(key)s") % {"key": repr(key)}


SETTINGS: tuple[Setting, ...] = (
    Setting("app_url", str, _app_url_default, gettext_noop("Project URL"),
            gettext_noop("Base URL shown for group endpoints (e.g. https://gateway.example.com)."),
            BASIC, required=True, normalize=_http_url),
    Setting("proxy_keys", str, "", gettext_noop("Global proxy keys"),
            gettext_noop("Comma-separated keys that clients may use on every group. A random "
                         "one is made at first boot (never the AUTH_KEY)."),
            BASIC, required=True, normalize=_key_list),
    Setting("request_log_retention_days", int, 7, gettext_noop("Log retention (days)"),
            gettext_noop("Request logs older than this are deleted; 0 keeps them forever."),
            BASIC, minimum=0, maximum=36500),
    Setting("request_log_write_interval_minutes", int, 1,
            gettext_noop("Log write interval (minutes)"),
            gettext_noop("How often buffered request logs are written; 0 writes each at once."),
            BASIC, minimum=0),
    Setting("enable_request_body_logging", bool, False, gettext_noop("Log request bodies"),
            gettext_noop("Store each request body (and user agent) with its log row."),
            BASIC, group_overridable=True),
    Setting("request_timeout", int, 600, gettext_noop("Request timeout (s)"),
            gettext_noop("Total time allowed for a non-streaming upstream request."),
            REQUEST, minimum=1, group_overridable=True),
    Setting("connect_timeout", int, 15, gettext_noop("Connect timeout (s)"),
            gettext_noop("Time allowed to open a connection to the upstream."),
            REQUEST, minimum=1, group_overridable=True),
    Setting("idle_conn_timeout", int, 120, gettext_noop("Idle connection timeout (s)"),
            gettext_noop("How long an idle upstream connection is kept for reuse."),
            REQUEST, minimum=1, group_overridable=True),
    Setting("response_header_timeout", int, 600, gettext_noop("Response header timeout (s)"),
            gettext_noop("Time allowed for the upstream to send its response headers (first "
                         "byte)."),
            REQUEST, minimum=1, group_overridable=True),
    Setting("max_idle_conns", int, 100, gettext_noop("Max idle connections"),
            gettext_noop("Upstream connections kept open for reuse, in all."),
            REQUEST, minimum=1, group_overridable=True),
    Setting("max_idle_conns_per_host", int, 50, gettext_noop("Max idle connections per host"),
            gettext_noop("Upstream connections kept open for reuse, per upstream host."),
            REQUEST, minimum=1, group_overridable=True),
    Setting("proxy_url", str, "", gettext_noop("Outbound proxy"),
            gettext_noop("HTTP, HTTPS or SOCKS5 proxy for upstream calls; empty uses "
                         "HTTP(S)_PROXY."),
            REQUEST, group_overridable=True, normalize=_proxy_url),
    Setting("max_retries", int, 3, gettext_noop("Max retries"),
            gettext_noop("Extra attempts, each on another key, before an error reaches the "
                         "client."),
            KEYS, minimum=0, group_overridable=True),
    Setting("blacklist_threshold", int, 3, gettext_noop("Blacklist threshold"),
            gettext_noop("Consecutive failures (5xx, timeouts) after which a key is marked "
                         "invalid; 0 never benches a key for them."),
            KEYS, minimum=0, group_overridable=True),
    Setting("failover_status_codes", str, "401-403,408,429,500-599",
            gettext_noop("Failover status codes"),
            gettext_noop("Upstream statuses that retry on another key (ranges allowed); empty: "
                         "none. GPT-Load's default 400-403,405-999 also retried the client's "
                         "own mistakes."),
            KEYS, group_overridable=True, normalize=_status_codes),
    Setting("key_validation_interval_minutes", int, 60,
            gettext_noop("Key validation interval (minutes)"),
            gettext_noop("How often invalid keys are re-checked and restored when they work "
                         "again."),
            KEYS, minimum=1, group_overridable=True),
    Setting("key_validation_concurrency", int, 10, gettext_noop("Key validation concurrency"),
            gettext_noop("Keys validated at the same time per group (keep below 20 on SQLite)."),
            KEYS, minimum=1, group_overridable=True),
    Setting("key_validation_timeout_seconds", int, 20, gettext_noop("Key validation timeout (s)"),
            gettext_noop("Time allowed for one key validation call."),
            KEYS, minimum=1, group_overridable=True),
    Setting("key_rpm", int, 0, gettext_noop("Requests per minute per key"),
            gettext_noop("Most calls one upstream key is sent in any minute (across nodes, "
                         "with Redis); a key at its cap leaves the rotation until the minute "
                         "frees room. 0: no cap."),
            LIMITS, minimum=0, group_overridable=True),
    Setting("key_rpd", int, 0, gettext_noop("Requests per day per key"),
            gettext_noop("Most calls one upstream key is sent in any 24 hours (across nodes, "
                         "with Redis). 0: no cap."),
            LIMITS, minimum=0, group_overridable=True),
    Setting("key_max_concurrency", int, 0, gettext_noop("Concurrent calls per key"),
            gettext_noop("Most calls in flight on one upstream key at once (a stream until its "
                         "end; across nodes, with Redis). 0: no cap."),
            LIMITS, minimum=0, group_overridable=True),
    Setting("key_wait_seconds", int, 0, gettext_noop("Wait for a key (s)"),
            gettext_noop("When every key is cooling or at its cap, how long a call may wait for "
                         "the first one to come back instead of being answered 503 at once. "
                         "0: no wait."),
            LIMITS, minimum=0, maximum=120, group_overridable=True),
)  # fmt: skip
REGISTRY: dict[str, Setting] = {s.key: s for s in SETTINGS}
GROUP_OVERRIDABLE = frozenset(s.key for s in SETTINGS if s.group_overridable)


def get(key: str) -> Setting:
    try:
        return REGISTRY[key]
    except KeyError:
        raise SettingError(unknown_setting(key)) from None


def defaults() -> dict[str, Any]:
    return {s.key: s.default_value() for s in SETTINGS}


def parse_system_values(stored: Mapping[str, str]) -> dict[str, Any]:
    """Typed system values from stored text; unknown keys are ignored, bad ones refused."""
    return {key: REGISTRY[key].parse(raw) for key, raw in stored.items() if key in REGISTRY}


def validate_group_config(config: Any) -> dict[str, Any]:
    """A group's overrides, typed and checked; `None` values are dropped (as in GPT-Load).

    Raises `SettingError` for a non-object, an unknown key, a setting that groups cannot
    override, or a bad value.
    """
    if not isinstance(config, Mapping):
        raise SettingError(_("config must be an object of setting overrides"))
    cleaned: dict[str, Any] = {}
    for key, raw in config.items():
        if raw is None:
            continue
        if key not in REGISTRY:
            raise SettingError(_("unknown config field %(key)s") % {"key": repr(key)})
        if key not in GROUP_OVERRIDABLE:
            raise SettingError(
                _("%(key)s is a system-wide setting and cannot be set per group")
                % {"key": repr(key)}
            )
        cleaned[key] = REGISTRY[key].parse(raw)
    return cleaned


def effective(group_config: Mapping[str, Any] | None, system: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting's value for a group: group override > system value > default."""
    values = defaults()
    values.update(system)
    if group_config:
        values.update({k: v for k, v in group_config.items() if k in GROUP_OVERRIDABLE})
    return values


# Which groups override a setting: the groups live in an app above this one, which
# registers how to find them (settings never import groups).
OverrideFinder = Callable[[str], list[str]]
_override_finders: list[OverrideFinder] = []


def register_override_finder(finder: OverrideFinder) -> None:
    if finder not in _override_finders:
        _override_finders.append(finder)


def overridden_by(key: str) -> list[str]:
    """The names of the groups whose config overrides setting `key`."""
    return [name for finder in _override_finders for name in finder(key)]
