"""What every bench script measures the same way: usable cores and process-tree memory."""

from __future__ import annotations

import contextlib
import os

import psutil


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(RSS, PSS) summed over `proc` and its descendants.

    RSS counts shared pages (torch's libraries, fork's copy-on-write, Ray's object store) once
    per process that maps them; PSS splits them between those processes, so it adds up to the
    real footprint (where PSS is unavailable, RSS stands in).
    """
    rss = pss = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for p in procs:
        with contextlib.suppress(psutil.Error):  # a worker may exit while we look
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
    return rss, pss
