"""Creates the benchmark's standard OpenAI group in the database that DATABASE_DSN names.

Run by bench/run.py after `manage.py migrate`, with the gateway's environment. It prints
one JSON line: the group, its key count and the effective settings that matter here.
The system settings are left at their defaults (request_log_write_interval_minutes too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORTED_SETTINGS = (
    "max_retries",
    "request_log_write_interval_minutes",
    "request_timeout",
    "connect_timeout",
    "key_rpm",
    "key_rpd",
    "key_max_concurrency",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--group", default="bench")
    parser.add_argument("--upstream", required=True, help="base URL of the fake upstream")
    parser.add_argument("--proxy-key", required=True, help="the group's proxy key")
    parser.add_argument("--key", action="append", required=True, help="an upstream key (repeat)")
    parser.add_argument(
        "--access-key",
        help="also an access key with this secret, every limit set (far above the load)",
    )
    parser.add_argument("--config", default="{}", help="the group's setting overrides (JSON)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gptload.settings")
    import django

    django.setup()
    from keys.models import APIKey, ChannelType, Group
    from settings_app.models import SystemSetting

    group = Group(
        name=args.group,
        channel_type=ChannelType.OPENAI,
        upstreams=[{"url": args.upstream, "weight": 1}],
        test_model="gpt-4o-mini",
        proxy_keys=args.proxy_key,
        config=json.loads(args.config),
    )
    group.full_clean()
    group.save()
    for secret in args.key:
        APIKey.build(group, secret).save()
    if args.access_key:
        from access.models import AccessKey, secret_hash
        from gptload.lib.secrets import mask

        access = AccessKey(name="bench", key_hash=secret_hash(args.access_key),
                           key_hint=mask(args.access_key), rpm=10**7, tpm=10**9,
                           daily_tokens=10**12, monthly_tokens=10**13, max_concurrency=10**5)  # fmt: skip
        access.full_clean()
        access.save()
        access.groups.set([group])
    effective = SystemSetting.objects.effective(group.config)
    print(
        json.dumps(
            {
                "group": group.name,
                "keys": group.api_keys.count(),
                "settings": {name: effective.get(name) for name in REPORTED_SETTINGS},
            }
        )
    )


if __name__ == "__main__":
    main()
