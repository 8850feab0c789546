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
    hooks_ran: bool = False
    """The flow's ``on_cancellation`` hooks ran for ``report``: a retried delivery runs them
    no more (``reporter.Reporter.deliver``)."""


def boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


def default_state_dir(environ: dict[str, str] | os._Environ[str], pool: str) -> Path:
    """``$STATE_DIRECTORY`` under systemd, else the per-user state dir, per pool."""
    if environ.get("STATE_DIRECTORY"):
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    base = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME", "/tmp")) / ".local" / "state")
    return Path(base) / "flow-worker" / pool


@attrs.define
class Ledger:
    directory: Path
    _lock_fd: int | None = None

    @property
    def runs_dir(self) -> Path:
        return self.directory / "runs"

    def open(self) -> None:
        """Create the directory and take the lock; :class:`LedgerError` says why not."""
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.directory / "ledger.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise LedgerError(f"cannot use state directory {self.directory}: {exc.strerror}") from None
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
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
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
                good.append(_converter.structure(json.loads(path.read_text()), Entry))
            except (OSError, ValueError, cattrs.BaseValidationError) as exc:
                aside = path.with_suffix(f".bad-{int(time.time())}")
                path.rename(aside)
                bad.append(f"{path.name}: {type(exc).__name__}: {exc} (moved to {aside.name})")
        for tmp in self.runs_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        return good, bad
