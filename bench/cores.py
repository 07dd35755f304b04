"""Which cores the benchmark's processes run on, for the cells that give the server a core of its own.

In production a replica's CPU is its own: PostgreSQL is Cloud SQL on other machines and the callers run
elsewhere. On a 2-core benchmark machine the real RunPipeline cells have three busy processes (the
server, PostgreSQL and the load client) where the bare cells have two, and the scheduler puts
PostgreSQL's and the client's work on the server's core too. The pinned cells take that difference out
for both servers alike: the server under test (real or bare) alone on the first core, its load client
and PostgreSQL on the others. The unpinned cells stay as they were and are reported beside them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

from bench import cpu


def all_cores() -> set[int]:
    """The cores this process may run on."""
    return set(os.sched_getaffinity(0))


def can_pin() -> bool:
    """Whether there are at least two cores to split between the server and the rest."""
    return len(all_cores()) >= 2


def split() -> tuple[set[int], set[int]]:
    """The server's core, and the cores of the rest."""
    cores = sorted(all_cores())
    return {cores[0]}, set(cores[1:])


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def pin(pids: Iterable[int], cores: set[int]) -> None:
    """Every thread of these processes and of their descendants onto `cores` (a process that went
    away meanwhile is skipped)."""
    for pid in pids:
        for process in cpu.tree(pid):
            for thread in _threads(process):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(thread, cores)


@contextlib.contextmanager
def server_alone(server: int, others: Iterable[int]) -> Iterator[set[int]]:
    """Pin `server` to the first core and `others` to the rest for the block; yields the rest's cores
    (for the load client started in the block), and gives every process all cores back after it."""
    own, rest = split()
    others = list(others)
    everything = all_cores()
    pin([server], own)
    pin(others, rest)
    try:
        yield rest
    finally:
        pin([server, *others], everything)
