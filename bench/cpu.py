"""CPU time of processes (Linux `/proc`), to split each cell's CPU between server, Envoy, emulator and
client on a machine where they all compete for the same cores."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on; the name may hold spaces


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def tree(pid: int) -> list[int]:
    """`pid` and its live descendants."""
    found = [pid]
    for child in _children(pid):
        found += tree(child)
    return found


def _own_seconds(pid: int) -> float:
    fields = _stat(pid)
    if fields is None:
        return 0.0
    # utime, stime, cutime, cstime are fields 14-17 of /proc/pid/stat; `fields` starts at field 3.
    return sum(int(v) for v in fields[11:15]) / _TICKS


def tree_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid`, its waited-for children and its live descendants."""
    return sum(_own_seconds(p) for p in tree(pid))


def self_seconds() -> float:
    """CPU seconds of this process, all threads."""
    return time.process_time()


def waited_children_seconds() -> float:
    """CPU seconds of this process's children that have ended and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def loop_seconds(pid: int) -> tuple[float, float]:
    """Seconds the main thread of `pid` (a server's event loop) has run on a core, and has waited runnable
    for one, since it started (`/proc/pid/task/pid/schedstat`); zeros where the kernel keeps no such
    statistics."""
    try:
        ran, waited, *_ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(ran) / 1e9, int(waited) / 1e9


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine (all cores) since boot, from `/proc/stat`."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICKS
