"""A throwaway PostgreSQL cluster on a free loopback port (Debian's package), for the fleet tests.

``initdb`` with trust authentication in a temporary directory, ``postgres`` started on
127.0.0.1 only (its socket in the same directory), one database, stopped by pid and
removed afterwards. As root, both run as the ``postgres`` user (PostgreSQL refuses root).
Durability is switched off (``fsync=off``): the cluster lives as long as a test module.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import free_port, wait_for


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (None: not installed)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def cluster(database: str = "prefect") -> Iterator[str]:
    """Yield an SQLAlchemy URL (``postgresql+asyncpg://…``) of a fresh database."""
    pg = bin_dir()
    if pg is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="flow-worker-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    port = free_port()
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            _as_postgres(
                [str(pg / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
        )
        log = (root / "postgres.log").open("ab")
        proc = subprocess.Popen(
            _as_postgres(
                [
                    str(pg / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-k",
                    str(root),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        psql = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres", "-qAtc"]

        def answers() -> bool:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"postgres exited: {(root / 'postgres.log').read_text()[-2000:]}")
            return subprocess.run([*psql, "select 1"], capture_output=True).returncode == 0

        wait_for(answers, 60, 0.2, "postgres to accept connections")
        subprocess.run([*psql, f"create database {database}"], check=True, capture_output=True)
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{database}"
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # fast shutdown
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)
