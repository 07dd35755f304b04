"""Child processes of the local stack: start (tied to our life), wait until ready (bounded), stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(url: str, expect: str = "") -> bool:
    """Whether GET `url` answers 200 (with `expect` in the body, when given)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200 and expect in response.read().decode(errors="replace"))
    except (urllib.error.URLError, OSError):
        return False


def tied_to_us(argv: Sequence[str], sig: signal.Signals) -> list[str]:
    """`argv` behind util-linux's `setpriv --pdeathsig`, so the child gets `sig` when the thread that
    started it dies, even by SIGKILL (no orphaned emulator or database after a killed test run); as it is
    where `setpriv` is missing (not Linux)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, f"--pdeathsig={sig.name.removeprefix('SIG')}", "--", *argv] if setpriv else list(argv)


def as_user(user: str | None) -> dict[str, Any]:
    """`subprocess` arguments that run a child as `user` with only that user's group (none: as we are)."""
    return {} if user is None else {"user": user, "group": user, "extra_groups": []}


class ChildProcess:
    """One supervised child process with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        *,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.name = name
        self._stop_signal = stop_signal
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            tied_to_us(argv, stop_signal),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            **as_user(user),
        )

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        """Poll `ready` until true; raise with the log's tail if the child dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            if ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        """The last lines of the child's log."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """The stop signal (SIGTERM unless told otherwise), then SIGKILL after `timeout` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(self._stop_signal)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._log.close()
