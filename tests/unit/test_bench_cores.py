"""The benchmark's pinned cells: the server under test alone on a core, the rest on the other cores, and
every process given all cores back afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from bench import cores

pytestmark = pytest.mark.skipif(not cores.can_pin(), reason="needs two cores to split")


@pytest.fixture
def two_processes() -> Iterator[tuple[int, int]]:
    started = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) for _ in range(2)]
    try:
        yield started[0].pid, started[1].pid
    finally:
        for process in started:
            process.kill()
            process.wait()


def test_the_server_gets_a_core_of_its_own_for_the_block(two_processes: tuple[int, int]) -> None:
    server, other = two_processes
    everything = cores.all_cores()
    own, rest = cores.split()
    assert own and rest and not own & rest and own | rest == everything
    with cores.server_alone(server, [other]) as given:
        assert given == rest
        assert os.sched_getaffinity(server) == own
        assert os.sched_getaffinity(other) == rest
    assert os.sched_getaffinity(server) == everything
    assert os.sched_getaffinity(other) == everything


def test_a_process_that_went_away_is_skipped(two_processes: tuple[int, int]) -> None:
    server, other = two_processes
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with cores.server_alone(server, [gone.pid, other]):
        assert os.sched_getaffinity(other) == cores.split()[1]
    assert os.sched_getaffinity(server) == cores.all_cores()
