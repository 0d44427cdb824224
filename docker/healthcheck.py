"""The image's HEALTHCHECK: is this container's role doing its work? Exit 0 if so, 1 if not.

The role is the one docker/entrypoint.sh started (it notes it in /tmp/gptload-role), or
the first argument (`python docker/healthcheck.py worker`):

- web: `GET /health` on this container's own PORT answers 200 (the database and, when
  configured, Redis answer);
- worker: the Celery worker of this container (`celery@<hostname>`) answers a ping;
- beat: beat's heartbeat is recent (beat notes it as its scheduler turns; there is one
  beat per installation, so the one heard from is this one);
- anything else (a one-off command): nothing to check.

The web check imports nothing of gptload: it runs every few seconds beside the server.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.request
from pathlib import Path

# The container's own /tmp, written by the entrypoint before the role starts.
ROLE_FILE = Path("/tmp/gptload-role")  # noqa: S108
APP = Path(__file__).resolve().parent.parent


def role() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    try:
        return ROLE_FILE.read_text().strip() or "web"
    except OSError:
        return "web"


def check_web() -> str | None:
    host = os.environ.get("HOST") or "0.0.0.0"
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = os.environ.get("PORT") or "3001"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no HTTP_PROXY
    try:
        with opener.open(f"http://{host}:{port}/health", timeout=8) as answer:
            return None if answer.status == 200 else f"/health answered {answer.status}"
    except OSError as exc:  # URLError and HTTPError (503) included
        return f"/health: {exc}"


def django_setup() -> None:
    sys.path.insert(0, str(APP))
    os.chdir(APP)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gptload.settings")


def check_worker() -> str | None:
    django_setup()
    from gptload.celery import app

    name = f"celery@{socket.gethostname()}"
    replies = app.control.ping(destination=[name], timeout=5.0) or []
    return None if any(name in reply for reply in replies) else f"{name} did not answer a ping"


def check_beat() -> str | None:
    django_setup()
    import django

    django.setup()
    from gptload.lib import heartbeat

    seen = heartbeat.last_seen(heartbeat.BEAT)
    if seen is None:
        return "beat never noted its heartbeat"
    if time.time() - seen > heartbeat.STALE_AFTER:
        return f"beat's heartbeat is {time.time() - seen:.0f} s old"
    return None


def main() -> int:
    checks = {"web": check_web, "worker": check_worker, "beat": check_beat}
    check = checks.get(role())
    if check is None:
        return 0
    try:
        problem = check()
    except Exception as exc:  # any failure to check is a failed check
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        print(problem[:300], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
