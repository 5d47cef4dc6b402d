"""How many cores this process may use, and how many threads one call of the compiled
routing loops and of the per-layer trace statistics may use."""

from __future__ import annotations

import os


def cores() -> int:
    """The cores this process may use (its CPU affinity on Linux)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def threads() -> int:
    """``MOESIM_THREADS`` when it is a positive integer, else :func:`cores`."""
    wanted = os.environ.get("MOESIM_THREADS", "")
    return int(wanted) if wanted.isdigit() and int(wanted) > 0 else cores()
