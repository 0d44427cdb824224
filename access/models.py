"""Access keys: who a client is on `/proxy/`, what it may call, and how much.

An access key stands beside the proxy keys (global or per group) as a client's
credential, with an identity the logs and rollups can name, a scope (groups, model
patterns), limits and an expiry. Its secret is made here, shown once, and stored only as
its SHA-256: the proxy looks a presented key up by the same digest, so the database
never holds anything a client could call with.
"""

from __future__ import annotations

import fnmatch
import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.db import models

# Field classes by name: the model has a field called `models`, which would shadow the
# module inside its class body.
from django.db.models import (
    BooleanField,
    CharField,
    DateTimeField,
    JSONField,
    ManyToManyField,
    PositiveBigIntegerField,
    PositiveIntegerField,
    TextField,
)
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from gptload.lib.secrets import mask
from keys.models import Group

SECRET_PREFIX = "gl-"  # noqa: S105 - a prefix that says what a secret is, not a secret
MAX_PATTERNS = 100
MAX_PATTERN_LENGTH = 200


def new_secret() -> str:
    """A fresh access key secret: `gl-` and 43 URL-safe characters (256 random bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    """What an access key is stored and looked up by: the hex SHA-256 of the whole secret
    (`proxy.snapshot.digest` is the same digest as bytes)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def validate_model_patterns(value: Any) -> None:
    """A list of at most 100 glob patterns (`gpt-4o*`, `claude-*`), each 1-200 characters."""
    if not isinstance(value, list):
        raise ValidationError(_('List the model patterns, e.g. ["gpt-4o*", "claude-*"].'))
    if len(value) > MAX_PATTERNS:
        raise ValidationError(
            _("At most %(max)d model patterns; %(count)d were given.")
            % {"max": MAX_PATTERNS, "count": len(value)}
        )
    for number, pattern in enumerate(value, start=1):
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValidationError(
                _("Model pattern %(number)d is empty or not text.") % {"number": number}
            )
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise ValidationError(
                _("Model pattern %(number)d is longer than %(max)d characters.")
                % {"number": number, "max": MAX_PATTERN_LENGTH}
            )


def storable_time(value: datetime) -> datetime:
    """`value` in UTC, if every database can store it (MySQL's DATETIME starts at year
    1000, and a time near year 9999 may not fit once moved to UTC)."""
    try:
        aware = value if timezone.is_aware(value) else timezone.make_aware(value)
        utc = aware.astimezone(UTC)
    except (OverflowError, ValueError):
        utc = None
    if utc is None or not 1000 <= utc.year <= 9998:
        raise ValidationError({"expires_at": _("Give a time between the years 1000 and 9998.")})
    return utc


@dataclass(frozen=True, slots=True)
class AccessRule:
    """An enabled access key as the proxy needs it: no ORM object, nothing lazy.

    `group_ids` empty and `models` empty mean every group and every model; a limit of 0
    means none. `expires_at` is Unix seconds (None: never).
    """

    id: int
    name: str
    digest: bytes
    group_ids: frozenset[int]
    models: tuple[str, ...]
    rpm: int
    tpm: int
    daily_tokens: int
    monthly_tokens: int
    max_concurrency: int
    expires_at: float | None

    def allows_group(self, group_id: int) -> bool:
        """Whether the group the client named in its URL (an aggregate's own id when it
        named an aggregate) is in scope."""
        return not self.group_ids or group_id in self.group_ids

    def allows_model(self, model: str) -> bool:
        """Whether `model` matches one of the patterns (case-sensitive, as model names are)."""
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    @property
    def limited(self) -> bool:
        """Whether any limit is set (a call of an unlimited key is not counted)."""
        return bool(self.rpm or self.max_concurrency or self.counts_tokens)

    @property
    def counts_tokens(self) -> bool:
        """Whether tokens are limited (per minute, day or month): calls reserve them."""
        return bool(self.tpm or self.daily_tokens or self.monthly_tokens)


class AccessKeyQuerySet(models.QuerySet["AccessKey"]):
    def rules(self) -> list[AccessRule]:
        """The enabled keys of this queryset as `AccessRule`s, expired ones included (the
        proxy tells "expired" from "unknown"). Two queries whatever their number: the keys'
        columns, then their group links from the M2M table alone (the keys as a subquery,
        not a list of ids)."""
        enabled = self.filter(enabled=True)
        rows = list(
            enabled.values_list(
                "pk", "name", "key_hash", "models", "rpm", "tpm", "daily_tokens",
                "monthly_tokens", "max_concurrency", "expires_at",
            )
        )  # fmt: skip
        links: dict[int, set[int]] = {}
        through = AccessKey.groups.through.objects.filter(accesskey_id__in=enabled.values("pk"))
        for key_id, group_id in through.values_list("accesskey_id", "group_id"):
            links.setdefault(key_id, set()).add(group_id)
        return [
            AccessRule(
                id=pk, name=name, digest=bytes.fromhex(key_hash),
                group_ids=frozenset(links.get(pk, ())), models=tuple(patterns or ()), rpm=rpm,
                tpm=tpm, daily_tokens=daily, monthly_tokens=monthly, max_concurrency=concurrency,
                expires_at=expires.timestamp() if expires else None,
            )
            for pk, name, key_hash, patterns, rpm, tpm, daily, monthly, concurrency, expires in rows
        ]  # fmt: skip


class AccessKey(models.Model):
    """A client's own credential for `/proxy/`, limited to some groups and models, with
    rate and token limits and an optional expiry. Only the secret's hash is stored."""

    name = CharField(gettext_lazy("name"), max_length=100)
    key_hash = CharField(max_length=64, unique=True, editable=False)
    key_hint = CharField(
        gettext_lazy("key"), max_length=32, editable=False,
        help_text=gettext_lazy("The secret, masked; the whole of it is shown once only."),
    )  # fmt: skip
    groups = ManyToManyField(
        Group, blank=True, related_name="access_keys", verbose_name=gettext_lazy("groups"),
        help_text=gettext_lazy("None chosen: every group."),
    )  # fmt: skip
    models = JSONField(
        gettext_lazy("models"), default=list, blank=True, validators=[validate_model_patterns],
        help_text=gettext_lazy("Glob patterns such as gpt-4o* or claude-*; none: every model."),
    )  # fmt: skip
    rpm = PositiveIntegerField(
        gettext_lazy("requests per minute"), default=0, help_text=gettext_lazy("0: no limit.")
    )
    tpm = PositiveIntegerField(
        gettext_lazy("tokens per minute"), default=0, help_text=gettext_lazy("0: no limit.")
    )
    daily_tokens = PositiveBigIntegerField(
        gettext_lazy("tokens per day"), default=0, help_text=gettext_lazy("0: no limit.")
    )
    monthly_tokens = PositiveBigIntegerField(
        gettext_lazy("tokens per month"), default=0, help_text=gettext_lazy("0: no limit.")
    )
    max_concurrency = PositiveIntegerField(
        gettext_lazy("concurrent requests"), default=0, help_text=gettext_lazy("0: no limit.")
    )
    expires_at = DateTimeField(
        gettext_lazy("expires at"), null=True, blank=True,
        help_text=gettext_lazy("Empty: never expires."),
    )  # fmt: skip
    enabled = BooleanField(gettext_lazy("enabled"), default=True)
    notes = TextField(gettext_lazy("notes"), blank=True)
    created_at = DateTimeField(auto_now_add=True)
    updated_at = DateTimeField(auto_now=True)

    objects = AccessKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = gettext_lazy("access key")
        verbose_name_plural = gettext_lazy("access keys")

    def __str__(self) -> str:
        return self.name

    def issue(self) -> str:
        """Gives the key a new secret and returns it: the caller shows it once and saves
        the key; the secret is never stored, only its hash and a masked hint."""
        secret = new_secret()
        self.key_hash = secret_hash(secret)
        self.key_hint = mask(secret)
        return secret

    def clean(self) -> None:
        self.name = self.name.strip()
        if not self.name:
            raise ValidationError({"name": _("Name the access key (who or what uses it).")})
        if isinstance(self.models, list):
            patterns = [p.strip() if isinstance(p, str) else p for p in self.models]
            self.models = list(dict.fromkeys(patterns))
        if self.expires_at is not None:
            self.expires_at = storable_time(self.expires_at)

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at
