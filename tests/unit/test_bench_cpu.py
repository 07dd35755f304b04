"""The benchmark's view of a server's event-loop thread: how long it ran and waited for a core."""

from __future__ import annotations

import subprocess
import sys
import time

from bench import cpu


def _finished(code: str) -> subprocess.Popen[bytes]:
    """A process that ran `code` and then sleeps (it is kept alive so its statistics stay readable)."""
    process = subprocess.Popen(
        [sys.executable, "-c", f"{code}\nimport sys, time\nprint(flush=True)\ntime.sleep(30)"],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.readline()
    return process


def test_a_busy_main_thread_shows_its_run_time_and_a_sleeping_one_none() -> None:
    busy = _finished("import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass")
    idle = _finished("import time\ntime.sleep(0.4)")
    try:
        busy_ran, busy_waited = cpu.loop_seconds(busy.pid)
        idle_ran, _ = cpu.loop_seconds(idle.pid)
        assert busy_ran >= 0.4  # the loop's 0.4 s of CPU, plus the interpreter's start
        assert busy_waited >= 0.0
        assert idle_ran < busy_ran - 0.3
        before = cpu.loop_seconds(busy.pid)
        time.sleep(0.2)
        assert cpu.loop_seconds(busy.pid)[0] - before[0] < 0.05  # it sleeps now
    finally:
        for process in (busy, idle):
            process.kill()
            process.wait()


def test_a_gone_process_reads_as_zeros() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert cpu.loop_seconds(process.pid) == (0.0, 0.0)
