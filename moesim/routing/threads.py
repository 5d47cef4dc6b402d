"""How many threads one call of the compiled routing loops and the per-layer trace
statistics may use: ``MOESIM_THREADS``, else the cores this process may use."""

from __future__ import annotations

import os


def threads() -> int:
    """``MOESIM_THREADS`` when it is a positive integer, else the cores of this process."""
    wanted = os.environ.get("MOESIM_THREADS", "")
    if wanted.isdigit() and int(wanted) > 0:
        return int(wanted)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
