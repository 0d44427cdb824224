"""Signing in: with the AUTH_KEY alone (as in GPT-Load), or as a Django user, and a limit
on failed attempts for both, the admin's form and `/api/auth/login`.

The AUTH_KEY signs in as the built-in superuser `gptload` (made on first use, with no
password of its own, so that it opens nothing but through the key). Operators with their
own Django users and permissions (a view-only role, say) sign in as themselves.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import BaseBackend
from django.core.cache import cache
from django.http import HttpRequest
from django.utils.translation import gettext as _

from gptload.lib.secrets import constant_time_in

log = logging.getLogger("gptload.signin")
KEY_USER = "gptload"
MAX_FAILURES = 10  # failed sign-ins from one address …
WINDOW = 15 * 60  # … within this many seconds lock it out for the rest of the window


def is_auth_key(candidate: str | None) -> bool:
    return bool(candidate) and constant_time_in(candidate or "", (settings.AUTH_KEY,))


class AuthKeyBackend(BaseBackend):
    """`authenticate(password=AUTH_KEY)` with no username (or `gptload`): the key's user."""

    def authenticate(self, request: HttpRequest | None, username: str | None = None,
                     password: str | None = None, **kwargs: Any) -> Any:  # fmt: skip
        if (username or KEY_USER) != KEY_USER or not is_auth_key(password):
            return None
        users = get_user_model()
        user, made = users.objects.get_or_create(
            username=KEY_USER, defaults={"is_staff": True, "is_superuser": True}
        )
        if made:
            user.set_unusable_password()
            user.save(update_fields=["password"])
        return user if user.is_active else None

    def get_user(self, user_id: int) -> Any:
        return get_user_model().objects.filter(pk=user_id, is_active=True).first()


def client_address(request: HttpRequest) -> str:
    return str(request.META.get("REMOTE_ADDR") or "unknown")


class Throttle:
    """Failed sign-ins per client address, counted in the cache (Redis in a cluster, so
    that every node counts the same failures)."""

    def key(self, request: HttpRequest) -> str:
        return f"signin-failures:{client_address(request)}"

    def blocked_for(self, request: HttpRequest) -> int:
        """Seconds left in the lock-out (0: not locked out)."""
        entry = cache.get(self.key(request))
        if not entry or entry[0] < MAX_FAILURES:
            return 0
        return max(1, int(entry[1] + WINDOW - time.time()))

    def failed(self, request: HttpRequest) -> None:
        entry = cache.get(self.key(request)) or (0, time.time())
        count = entry[0] + 1
        cache.set(self.key(request), (count, entry[1]), WINDOW)
        if count == MAX_FAILURES:
            log.warning("%d failed sign-ins from %s: locked out for %d minutes", count,
                        client_address(request), WINDOW // 60)  # fmt: skip

    def succeeded(self, request: HttpRequest) -> None:
        cache.delete(self.key(request))


throttle = Throttle()


def too_many_failures(wait: int) -> str:
    """What a locked-out caller is told, `wait` seconds before the window ends."""
    return _("Too many failed sign-ins from your address: try again in %(minutes)d minutes.") % {
        "minutes": (wait + 59) // 60
    }
