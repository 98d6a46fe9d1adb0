"""How many CPU threads torch may use (``run.threads``).

On a shared machine torch's default, one OpenMP thread per core, oversubscribes: its threads
spin-wait for each other while another process holds a core, and a 2-core box measured one
training step a minute instead of several a second. ``run.threads=null`` (the default) takes what
the machine can give: the cores this process may run on, less those other processes are running
on right now, shared between the processes of a torchrun launch on this host. An explicit
``OMP_NUM_THREADS`` is respected as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["auto_threads", "busy_cores", "cpu_threads"]

log = logging.getLogger(__name__)

_active = False  # a cpu_threads context is open: nested ones (compare -> train) leave it be


def auto_threads(cores: int, busy: int, processes: int = 1) -> int:
    """The threads for one of ``processes`` processes on ``cores`` cores of which other programs
    keep ``busy`` running: never fewer than one. Several processes of one launch share the cores
    evenly (they are each other's load, which ``busy`` would then count twice)."""
    if processes > 1:
        return max(1, cores // processes)
    return max(1, cores - busy)


def _running(path: Path) -> int:
    """Threads in state R (running or runnable) under ``/proc/<pid>/task``."""
    count = 0
    for stat in path.glob("*/stat"):
        with contextlib.suppress(OSError):
            # The state follows the command name, which is in parentheses and may hold spaces.
            count += stat.read_text().rpartition(")")[2].split()[0] == "R"
    return count


def busy_cores(samples: int = 3, interval_s: float = 0.01) -> int:
    """Cores that other processes keep busy now: the machine's runnable threads less this
    process's own, the median of a few samples (a snapshot catches passing threads). 0 where
    ``/proc`` is not there to tell."""
    loadavg = Path("/proc/loadavg")
    if not loadavg.is_file():
        return 0
    counts = []
    for i in range(samples):
        if i:
            time.sleep(interval_s)
        runnable = int(loadavg.read_text().split()[3].split("/")[0])
        counts.append(max(0, runnable - _running(Path("/proc/self/task"))))
    return round(statistics.median(counts))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def cpu_threads(requested: int | None) -> Iterator[int]:
    """Run the body with ``requested`` torch threads (None: :func:`auto_threads`, or
    ``OMP_NUM_THREADS`` where set); the previous setting is restored afterwards."""
    global _active
    before = torch.get_num_threads()
    if _active:
        yield before
        return
    if requested is not None:
        threads, why = requested, "run.threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        threads, why = before, "OMP_NUM_THREADS"
    else:
        cores, busy = _cores(), busy_cores()
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = auto_threads(cores, busy, processes)
        why = f"{cores} cores, {busy} busy with other work"
        why += f", {processes} processes" if processes > 1 else ""
    log.info("torch uses %d CPU thread(s) (%s; run.threads sets it)", threads, why)
    torch.set_num_threads(threads)
    _active = True
    try:
        yield threads
    finally:
        _active = False
        torch.set_num_threads(before)
