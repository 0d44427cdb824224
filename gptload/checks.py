"""System checks on the operator's secrets, for `manage.py check --deploy`.

Not run by every command: `serve` prints its own banner about a weak AUTH_KEY, and
the other commands are no place to repeat it.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Tags, Warning, register

from gptload.lib.secrets import weakness


@register(Tags.security, deploy=True)
def check_secrets(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
    warnings = []
    auth_problem = weakness(settings.AUTH_KEY)
    if auth_problem:
        warnings.append(
            Warning(
                f"AUTH_KEY is weak: {auth_problem}.",
                hint="Anyone who knows it controls the console and the management API. "
                "Set AUTH_KEY to a long random value, e.g. `python -c "
                "\"import secrets; print('sk-' + secrets.token_urlsafe(36))\"`.",
                id="gptload.W001",
            )
        )
    if settings.ENCRYPTION_KEY and (problem := weakness(settings.ENCRYPTION_KEY)):
        warnings.append(
            Warning(
                f"ENCRYPTION_KEY is weak: {problem}.",
                hint="Choose a long random value; keys stored under it must be re-encrypted if it changes.",
                id="gptload.W002",
            )
        )
    return warnings
