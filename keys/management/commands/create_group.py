"""`manage.py create_group`: a group from the command line, refused for the same reasons
the admin and the API refuse one (`Group.full_clean()`, `GroupSubGroup.full_clean()`)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import IntegrityError, transaction

from keys import groups
from keys.models import ChannelType, Group, GroupType
from settings_app.models import SystemSetting

TRAILING_NUMBER = re.compile(r"(?P<rest>.+):(?P<number>\d+)")
OPTION_OF_FIELD = {
    "name": "NAME",
    "channel_type": "--channel",
    "upstreams": "--upstream",
    "test_model": "--test-model",
    "display_name": "--display-name",
    "proxy_keys": "--proxy-keys",
    "weight": "--member weight",
    "sub_group": "--member",
    "group": "--member",
}


class Command(BaseCommand):
    help = (
        "Create a group. A standard group needs --upstream (one or more) and --test-model; an "
        "--aggregate group routes to --member groups of its channel instead. Prints the group "
        "and the endpoint clients call; a refused value exits 1 with the reason."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="lowercase letters, digits, '-' or '_' (the URL segment)")
        parser.add_argument("--channel", required=True, choices=ChannelType.values)
        parser.add_argument(
            "--upstream", action="append", default=[], metavar="URL[:WEIGHT]",
            help="an upstream base URL, repeatable. WEIGHT (default 1) is a trailing :N after "
            "the host part: https://api.openai.com/:3, https://example.com/v1:3 or "
            "http://10.0.0.5:8080:2 (a single :N right after the host is its port)",
        )  # fmt: skip
        parser.add_argument("--test-model", default="", help="model used to validate keys")
        parser.add_argument("--display-name", default="")
        parser.add_argument("--proxy-keys", default="", metavar="K1,K2", help="group proxy keys")
        parser.add_argument("--aggregate", action="store_true", help="an aggregate group")
        parser.add_argument(
            "--member", action="append", default=[], metavar="NAME[:WEIGHT]",
            help="a standard group routed to by the aggregate, repeatable; WEIGHT 0-1000, "
            "default 1",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        group, members = build_group(options)
        try:
            with transaction.atomic():
                group.save()
                if members:
                    groups.add_members(group, [(m.pk, weight) for m, weight in members])
        except ValidationError as exc:
            raise CommandError(one_line(exc)) from None
        except groups.GroupOperationError as exc:
            raise CommandError(exc.message) from None
        except IntegrityError:
            raise CommandError(f"a group named {group.name!r} already exists") from None
        self.stdout.write(describe(group, members))


def build_group(options: dict[str, Any]) -> tuple[Group, list[tuple[Group, int]]]:
    """The unsaved, validated group and its members; raises `CommandError` with the reason."""
    aggregate = bool(options["aggregate"])
    if aggregate and (options["upstream"] or options["test_model"]):
        raise CommandError(
            "an aggregate group has no upstreams or test model of its own: drop --upstream "
            "and --test-model (its --member groups have them)"
        )
    if options["member"] and not aggregate:
        raise CommandError("--member needs --aggregate (only aggregate groups have members)")
    group = Group(
        name=options["name"],
        channel_type=options["channel"],
        group_type=GroupType.AGGREGATE if aggregate else GroupType.STANDARD,
        upstreams=[parse_upstream(value) for value in options["upstream"]],
        test_model=options["test_model"],
        display_name=options["display_name"],
        proxy_keys=options["proxy_keys"],
    )
    try:
        group.full_clean(validate_unique=False)
    except ValidationError as exc:
        raise CommandError(one_line(exc)) from None
    if Group.objects.filter(name=group.name).exists():
        raise CommandError(f"a group named {group.name!r} already exists")
    return group, find_members(options["member"])


def parse_upstream(value: str) -> dict[str, Any]:
    """`URL[:WEIGHT]` → `{"url", "weight"}`.

    A URL holds colons of its own, so a trailing `:N` is a weight only where it cannot be
    the port: after a path (`https://host/v1:2`) or after a port (`http://host:8080:2`).
    """
    match = TRAILING_NUMBER.fullmatch(value.strip())
    if match is None:
        return {"url": value.strip(), "weight": 1}
    parts = urlsplit(value.strip())
    host_and_port = parts.netloc.rpartition("@")[2]
    after_host = (
        host_and_port.rpartition("]")[2] if host_and_port.startswith("[") else host_and_port
    )
    is_port = not (parts.path or parts.query or parts.fragment) and after_host.count(":") < 2
    if is_port:
        return {"url": value.strip(), "weight": 1}
    return {"url": match["rest"], "weight": int(match["number"])}


def find_members(values: list[str]) -> list[tuple[Group, int]]:
    """`NAME[:WEIGHT]` values → `(group, weight)`; raises `CommandError` for unknown names."""
    wanted: list[tuple[str, int]] = []
    for value in values:
        name, colon, weight = value.strip().rpartition(":")
        if not colon:
            name, weight = weight, "1"
        if not weight.isdigit():
            raise CommandError(f"--member {value}: write NAME or NAME:WEIGHT (0-1000)")
        if any(name == seen for seen, _ in wanted):
            raise CommandError(f"--member {name} is given twice")
        wanted.append((name, int(weight)))
    found = {g.name: g for g in Group.objects.filter(name__in=[name for name, _ in wanted])}
    missing = [name for name, _ in wanted if name not in found]
    if missing:
        raise CommandError(f"--member {missing[0]}: no group has that name")
    return [(found[name], weight) for name, weight in wanted]


def one_line(exc: ValidationError) -> str:
    """A model's refusal as one line naming the option to fix."""
    if not hasattr(exc, "error_dict"):
        return " ".join(exc.messages)
    parts = []
    for field, messages in exc.message_dict.items():
        text = " ".join(messages)
        option = OPTION_OF_FIELD.get(field, field)
        parts.append(text if field == "__all__" else f"{option}: {text}")
    return "; ".join(parts)


def describe(group: Group, members: list[tuple[Group, int]]) -> str:
    app_url = str(SystemSetting.objects.effective()["app_url"])
    lines = [
        f"Created {group.group_type} group {group.name!r} ({group.channel_type}), id {group.pk}."
    ]
    for upstream in group.upstreams:
        lines.append(f"  upstream:   {upstream['url']} (weight {upstream['weight']})")
    if group.test_model and not group.is_aggregate:
        lines.append(f"  test model: {group.test_model}")
    for member, weight in members:
        lines.append(f"  member:     {member.name} (weight {weight})")
    if group.proxy_key_list:
        lines.append(f"  proxy keys: {len(group.proxy_key_list)} of its own")
    lines.append(f"  endpoint:   {groups.endpoint(app_url, group.name)}")
    return "\n".join(lines)
