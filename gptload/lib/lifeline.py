"""No gptload process outlives the one that started it, however that one dies.

A parent puts its pid in `GPTLOAD_PARENT_PID` for its children (`child_env()`); a child
whose parent is that pid asks Linux to send it SIGTERM when the parent goes
(`PR_SET_PDEATHSIG`), SIGKILL and the OOM killer included, and then stops as it would on
a Ctrl-C. `manage.py serve` does this for its uvicorn workers and its embedded Celery
worker, and the test suite for every server it starts. Elsewhere (not Linux) it does
nothing, and a clean stop still stops the children.
"""

from __future__ import annotations

import ctypes
import os
import signal

VARIABLE = "GPTLOAD_PARENT_PID"
PR_SET_PDEATHSIG = 1


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that must die with this process."""
    return {**(os.environ if base is None else base), VARIABLE: str(os.getpid())}


def hold(parent: int) -> None:
    """Called early in a child: SIGTERM when `parent` dies (if it is our parent)."""
    if not parent or os.getppid() != parent:
        return  # started by someone else (a worker of a worker): its own parent holds it
    _ask(parent)


def hold_forked(parent: int) -> None:
    """The same for a process forked (not started) by a held one, which the kernel does
    not let inherit the request: Celery's embedded beat, forked by the worker.

    `parent` is the forking process's pid as it knew it before the fork; if it is already
    gone, the child stops at once.
    """
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _ask(parent)


def _ask(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
