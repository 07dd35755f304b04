"""The local PostgreSQL: the server binaries of the `pgserver` wheel as a child process on 127.0.0.1.

The wheel's own launcher (`pgserver.get_server`) daemonizes through `pg_ctl` and serves a Unix socket
only; here `postgres` runs in the foreground as a supervised child like the emulator, on a TCP port
and on a Unix socket in its data folder (which the benchmark and the tests connect to), so a test's or
`make run`'s stop ends it (SIGINT: fast shutdown, 0.01 s). PostgreSQL refuses to run as root: as root,
`initdb` and `postgres` run as the system user `pgserver` (created once, as the wheel does), which owns
the data folder.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pwd
import signal
import stat
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from server.localstack.process import ChildProcess, as_user
from server.settings import Settings

SYSTEM_USER = "pgserver"


def bin_dir() -> Path:
    """The folder of the wheel's PostgreSQL binaries (without importing the wheel's launcher)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pgserver wheel is missing: run `make install` first")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _system_user() -> str | None:
    """The user PostgreSQL runs as: ourselves, or `pgserver` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    return SYSTEM_USER


def _prepare(data_dir: Path, user: str | None) -> None:
    """Create the data folder, owned by `user`, with every parent traversable by it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for folder in (data_dir, *[p for p in data_dir.rglob("*") if p.is_dir()]):
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    for path in data_dir.rglob("*"):
        if not path.is_dir():
            os.chown(path, entry.pw_uid, entry.pw_gid)
    data_dir.chmod(0o700)
    for parent in data_dir.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


SOCKET_PATH_MAX = 100  # a Unix socket's path must fit in sockaddr_un (107 bytes on Linux)


def dsn(port: int, database: str = "postgres", socket_dir: Path | None = None) -> str:
    """The DSN of a local server (trust authentication): its Unix socket in `socket_dir` if given and
    short enough, else 127.0.0.1. The socket spares every statement the loopback TCP stack, a good part
    of a client's and the server's CPU per statement."""
    if socket_dir is not None and len(str(socket_dir / f".s.PGSQL.{port}")) <= SOCKET_PATH_MAX:
        return f"postgresql://postgres@/{database}?host={socket_dir}&port={port}"
    return f"postgresql://postgres@127.0.0.1:{port}/{database}"


class Postgres:
    """A running local PostgreSQL on 127.0.0.1 and on a Unix socket in its data folder; `dsn` connects to
    its `postgres` database (through the socket when its path fits)."""

    def __init__(
        self, *, port: int, data_dir: Path, log_path: Path, durable: bool = True, timeout: float = 60.0
    ) -> None:
        binaries = bin_dir()
        user = _system_user()
        pgdata = data_dir / "pgdata"
        _prepare(data_dir, user)
        if not (pgdata / "PG_VERSION").exists():
            initdb = subprocess.run(
                [
                    str(binaries / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    *([] if durable else ["--no-sync"]),
                ],
                check=False,
                capture_output=True,
                **as_user(user),
            )
            if initdb.returncode:
                raise RuntimeError(f"initdb failed: {initdb.stderr.decode(errors='replace')[-2000:]}")
        # Not durable (tests): no fsync; a crash of the machine may lose data, a crash of a server may not.
        speed = [] if durable else ["-c", "fsync=off", "-c", "full_page_writes=off"]
        self.port = port
        self.dsn = dsn(port, socket_dir=pgdata)
        self._child = ChildProcess(
            "postgres",
            [
                str(binaries / "postgres"),
                "-D",
                str(pgdata),
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={pgdata}",
                "-c",
                "max_connections=200",
                *speed,
            ],
            log_path,
            user=user,
            stop_signal=signal.SIGINT,
        )
        ready = [str(binaries / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        self._child.wait_until(lambda: subprocess.run(ready, check=False).returncode == 0, timeout)

    @property
    def pid(self) -> int:
        """The postmaster's process id."""
        return self._child.process.pid

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster); the data stays in the data folder."""
        self._child.stop()


def is_running(port: int) -> bool:
    """Whether a PostgreSQL answers on 127.0.0.1:`port`."""
    probe = [str(bin_dir() / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
    return subprocess.run(probe, check=False).returncode == 0


@asynccontextmanager
async def embedded(settings: Settings) -> AsyncIterator[Postgres | None]:
    """Start the local PostgreSQL for the duration of the block unless it already runs (or is not wanted)."""
    if not settings.postgres_embedded or await asyncio.to_thread(is_running, settings.postgres_port):
        yield None
        return
    server = await asyncio.to_thread(
        Postgres,
        port=settings.postgres_port,
        data_dir=settings.postgres_data_dir,
        log_path=settings.state_dir / "logs" / "postgres.log",
    )
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)
