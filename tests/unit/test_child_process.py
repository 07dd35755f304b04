"""Children of the local stack die with the process that started them, even when it is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from server.localstack.process import ChildProcess

PARENT = """
import sys, time
from pathlib import Path
from server.localstack.process import ChildProcess
child = ChildProcess("sleeper", ["sleep", "120"], Path(sys.argv[1]))
print(child.process.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits for its (new) parent to reap it.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_child_dies_with_its_killed_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "sleeper.log")], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    for _ in range(100):  # setpriv has armed the signal once it has exec'd the command
        if Path(f"/proc/{child}/comm").read_text().strip() == "sleep":
            break
        time.sleep(0.02)
    assert alive(child)
    parent.kill()
    parent.wait(10)
    for _ in range(100):
        if not alive(child):
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived its SIGKILLed parent")


def test_stop_still_stops_the_child(tmp_path: Path) -> None:
    child = ChildProcess("sleeper", ["sleep", "120"], tmp_path / "sleeper.log")
    assert child.process.poll() is None
    child.stop(timeout=5)
    assert child.process.returncode == -signal.SIGTERM
