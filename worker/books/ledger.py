"""The on-disk record of the runs this worker owns, so a restarted worker adopts or reports them.

Layout: one JSON file per run, ``<state_dir>/runs/<flow_run_id>.json``, written
atomically (temporary file, fsync, rename, fsync of the directory) at each step of the
run's life. A file exists exactly while the worker has something to do about the run:

=============  =====================================================================
phase          meaning (what a restarted worker does, see ``decisions.reconcile``)
=============  =====================================================================
``claiming``   a PENDING claim with ``transition_id`` is being proposed
``claimed``    the claim was accepted; the process is not started yet
``started``    the process runs: ``pid``, ``pgid``, ``start_time``, ``boot_id``
``finished``   the process is gone; ``report`` is a state still to be delivered
=============  =====================================================================

The file is removed once the run needs nothing more. ``state_dir/ledger.lock`` is held
(``flock``) for the worker's lifetime, so two workers never share one ledger.

The state directory is private (``host/private.py``): refused if another user owns it or
could write in it; ``runs/`` and ``output/`` are 0700, every file 0600, whatever the
umask; no file is opened through a symbolic link.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Final

import attrs
import cattrs

from worker.host import private

BOOT_ID_PATH: Final = Path("/proc/sys/kernel/random/boot_id")
_converter = cattrs.Converter(forbid_extra_keys=False)


class LedgerError(RuntimeError):
    """The state directory cannot be used (permissions, or another worker holds it)."""


@attrs.frozen
class Report:
    """A state the worker owes the API for a run.

    ``kind``: ``crash`` (propose CRASHED), ``crash_if_running`` (CRASHED only if the
    run is not final), ``cancelled`` (force CANCELLED unless already CANCELLED),
    ``reschedule`` (force SCHEDULED).
    """

    kind: str
    message: str
    transition_id: str


@attrs.frozen
class Entry:
    flow_run_id: str
    flow_run_name: str
    pool: str
    worker_name: str
    phase: str
    transition_id: str = ""
    pid: int | None = None
    pgid: int | None = None
    start_time: int | None = None
    boot_id: str | None = None
    claimed_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    returncode: int | None = None
    report: Report | None = None
    limits: dict[str, int] | None = None
    """The run's resource limits (``runlimits.RunLimits.items``), re-applied to its cgroup
    by the worker that adopts it."""
    hooks_ran: bool = False
    """The flow's ``on_cancellation`` hooks ran for ``report``: a retried delivery runs them
    no more (``reporter.Reporter.deliver``)."""


def boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


def default_state_dir(environ: dict[str, str] | os._Environ[str], pool: str) -> Path:
    """``$STATE_DIRECTORY`` under systemd, else the per-user state dir, per pool. Without
    ``HOME`` (nor ``XDG_STATE_HOME``) there is no per-user directory: :class:`LedgerError`
    (a guess could be a shared directory, or another one at the next start, which would
    not find the runs this one leaves)."""
    if environ.get("STATE_DIRECTORY"):
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    base = environ.get("XDG_STATE_HOME") or (
        str(Path(environ["HOME"]) / ".local" / "state") if environ.get("HOME") else None
    )
    if base is None:
        raise LedgerError(
            "no state directory: HOME is not set, so there is no per-user one; set state_dir "
            "(--state-dir, FLOW_WORKER_STATE_DIR or state_dir in the config file), or run under "
            "systemd with StateDirectory= ($STATE_DIRECTORY)"
        )
    return Path(base) / "flow-worker" / pool


@attrs.define
class Ledger:
    directory: Path
    _lock_fd: int | None = None

    @property
    def runs_dir(self) -> Path:
        return self.directory / "runs"

    @property
    def output_dir(self) -> Path:
        """Where the runs' stdout and stderr files are (``handle.output_files``)."""
        return self.directory / "output"

    def open(self) -> None:
        """Create (or check) the directory and take the lock; :class:`LedgerError` says why not."""
        try:
            self.directory = private.state_dir(self.directory)
            private.private_dir(self.runs_dir)
            private.private_dir(self.output_dir)
            fd = private.open_private(self.directory / "ledger.lock", os.O_RDWR | os.O_CREAT)
        except private.PrivacyError as exc:
            raise LedgerError(str(exc)) from None
        except OSError as exc:
            named = str(exc.filename) if exc.filename else str(self.directory)
            where = f" ({named})" if named != str(self.directory) else ""
            raise LedgerError(f"cannot use state directory {self.directory}: {exc.strerror}{where}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LedgerError(
                f"state directory {self.directory} is in use by another flow-worker (pid {holder}); "
                "give each worker its own state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _path(self, run_id: str) -> Path:
        return self.runs_dir / f"{run_id}.json"

    def write(self, entry: Entry) -> None:
        path = self._path(entry.flow_run_id)
        tmp = path.with_suffix(".tmp")
        data = json.dumps(_converter.unstructure(entry), sort_keys=True).encode()
        fd = private.open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        self._sync_dir()

    def update(self, entry: Entry, **changes: Any) -> Entry:
        new = attrs.evolve(entry, **changes)
        self.write(new)
        return new

    def remove(self, run_id: str) -> None:
        try:
            self._path(run_id).unlink()
        except FileNotFoundError:
            return
        try:
            self._sync_dir()
        except OSError:
            pass  # best effort: an entry back after a power loss is checked against the API, harmlessly

    def _sync_dir(self) -> None:
        fd = os.open(self.runs_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def entries(self) -> tuple[list[Entry], list[str]]:
        """Every readable entry, and a description of each unreadable file (kept aside)."""
        good: list[Entry] = []
        bad: list[str] = []
        for path in sorted(self.runs_dir.glob("*.json")):
            try:
                good.append(_converter.structure(json.loads(private.read_private(path)), Entry))
            except (OSError, ValueError, cattrs.BaseValidationError) as exc:
                aside = path.with_suffix(f".bad-{int(time.time())}")
                path.rename(aside)
                bad.append(f"{path.name}: {type(exc).__name__}: {exc} (moved to {aside.name})")
        for tmp in self.runs_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        return good, bad
