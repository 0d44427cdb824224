"""Which headers cross the gateway, and the groups' header rules.

Shared by the proxy and the key checker, so that an upstream that wants its key in
another header is checked the way it is used.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded either way.
# `host` and `content-length` are the sender's to set for the body it sends.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
                        "host", "content-length"})  # fmt: skip
# The client's own credential for gptload, never passed upstream.
CLIENT_CREDENTIALS = frozenset({"authorization", "x-api-key", "x-goog-api-key"})
# Set by the server that answers the client (it adds its own `date` and `server`), or
# by gptload for every proxied answer: an upstream's cookies would be set on gptload's own
# origin (the console's), and its content type and policy must not let a browser run
# what it sent there (see ANSWER_SECURITY).
SERVER_OWNED = frozenset({"date", "server", "set-cookie", "set-cookie2",
                          "x-content-type-options", "content-security-policy"})  # fmt: skip
# Added to every answer under /proxy/: whatever an upstream sends (HTML, an SVG, a script)
# is never sniffed into something else, and is sandboxed if a browser renders it.
ANSWER_SECURITY = ((b"x-content-type-options", b"nosniff"),
                   (b"content-security-policy", b"sandbox; default-src 'none'; frame-ancestors 'none'"))  # fmt: skip
VARIABLES = ("${CLIENT_IP}", "${GROUP_NAME}", "${API_KEY}", "${TIMESTAMP_MS}", "${TIMESTAMP_S}")


def connection_tokens(value: str) -> set[str]:
    """Headers named by a `Connection` header: hop-by-hop for this message too."""
    return {token.strip().lower() for token in value.split(",") if token.strip()}


@dataclass(frozen=True)
class HeaderRule:
    name: str
    value: str  # with ${…} variables; unused for a removal
    remove: bool
    templated: bool


class HeaderRules:
    """A group's header rules, parsed once: `apply()` costs nothing when there are none."""

    def __init__(self, rules: Iterable[Mapping[str, str]], group_name: str) -> None:
        self.group_name = group_name
        self.rules = tuple(
            HeaderRule(
                name=str(rule["key"]).strip().lower(),
                value=str(rule.get("value", "")),
                remove=rule.get("action", "set") == "remove",
                templated="${" in str(rule.get("value", "")),
            )
            for rule in rules
        )

    def __bool__(self) -> bool:
        return bool(self.rules)

    def apply(self, headers: dict[str, str], key: str, client_ip: str) -> None:
        """Sets or removes the rules' headers in `headers` (lower-case names)."""
        variables: dict[str, str] | None = None
        for rule in self.rules:
            if rule.remove:
                headers.pop(rule.name, None)
                continue
            value = rule.value
            if rule.templated:
                variables = variables or self.variables(key, client_ip)
                for name, replacement in variables.items():
                    value = value.replace(name, replacement)
            headers[rule.name] = value

    def variables(self, key: str, client_ip: str) -> dict[str, str]:
        stamp = time.time()
        return dict(zip(VARIABLES, (client_ip, self.group_name, key, str(int(stamp * 1000)),
                                    str(int(stamp))), strict=True))  # fmt: skip
