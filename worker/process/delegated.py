"""The worker's delegated cgroup v2 subtree: found, the worker moved into its leaf, the
controllers turned on for the runs, and the dead man's switch that turns them off when the
worker is gone (``cgroups.py`` makes the runs' cgroups in it).

:func:`detect` checks what per-run cgroups need, and says what is missing (:class:`Off`):
a pure v2 hierarchy, a systemd service (not a terminal's scope), a cgroup of its own that
is not the root, writable, delegated to it (systemd's mark, or owned by its user), and the
controllers there. :func:`move_in` moves the worker (and anything else in the unit's
cgroup) into ``<unit>/worker``; :func:`enable` turns ``cpu``, ``memory`` and ``pids`` on
for the unit's children. :class:`Switch` says why a switch is needed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Final

import attrs
import structlog
import trio

from worker.process import reaper

log = structlog.get_logger("flow_worker")

ROOT: Final = Path("/sys/fs/cgroup")
SELF: Final = Path("/proc/self/cgroup")
WANTED: Final = ("cpu", "memory", "pids")
"""The controllers runs' limits need (``runlimits.CONTROLLER``)."""
LEAF: Final = "worker"
DELEGATE_XATTRS: Final = ("trusted.delegate", "user.delegate")
"""How systemd (251+) marks a delegated cgroup: what tells root that the cgroup is its own."""


class Off(Exception):
    """Per-run cgroups are not possible here; the message says why."""


def own_cgroup(text: str) -> str:
    """The worker's cgroup path from ``/proc/self/cgroup``'s text; :class:`Off` unless the
    host uses the unified (v2) hierarchy alone."""
    lines = [line for line in text.splitlines() if line.strip()]
    if any(not line.startswith("0::") for line in lines):
        raise Off("a cgroup v1 hierarchy is in use (legacy or hybrid): per-run cgroups need cgroup v2 alone")
    if len(lines) != 1:
        raise Off("/proc/self/cgroup names no cgroup v2 path")
    return lines[0][3:]


def _delegated(base: Path, uid: int) -> bool:
    """Whether the cgroup is the worker's to manage: marked so by systemd, or (not root)
    owned by its user, as systemd chowns a delegated cgroup to the unit's ``User=``."""
    for name in DELEGATE_XATTRS:
        try:
            if os.getxattr(base, name) == b"1":
                return True
        except OSError:
            continue
    names = ("", "cgroup.procs", "cgroup.subtree_control")
    return uid != 0 and all((base / name).stat().st_uid == uid for name in names)


def detect(
    text: str, service: bool = True, root: Path = ROOT, uid: int | None = None
) -> tuple[Path, frozenset[str]]:
    """The worker's delegated cgroup (a directory) and the wanted controllers it offers;
    :class:`Off` with the reason if there is none. ``service``: started by systemd as a
    service (``INVOCATION_ID``): a terminal's scope is the user's, not the worker's."""
    path = own_cgroup(text)
    if not service:
        raise Off("not a systemd service: per-run cgroups need a unit with Delegate=yes")
    if path in ("/", ""):
        raise Off("the worker is in the root cgroup: not a systemd service with Delegate=yes")
    base = root / path.lstrip("/")
    if not (base / "cgroup.controllers").is_file():
        raise Off(f"no cgroup v2 hierarchy at {root}")
    if os.statvfs(base).f_flag & os.ST_RDONLY:
        raise Off(f"{root} is read-only here (ProtectControlGroups=yes in the unit?)")
    uid = os.geteuid() if uid is None else uid
    if not _delegated(base, uid) or not os.access(base, os.W_OK):
        raise Off(f"the worker's cgroup {path} is not delegated to it (Delegate=yes in the unit)")
    offered = set((base / "cgroup.controllers").read_text().split())
    return base, frozenset(offered & set(WANTED))


def write(path: Path, text: str) -> None:
    """One write to a cgroup file (each write is one command to the kernel)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def pids_in(path: Path) -> list[int]:
    try:
        return [int(line) for line in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def move_in(base: Path, me: int | None = None) -> None:
    """Move this process (and whatever else is in ``base``) into ``base/worker``: cgroup v2
    allows controllers for ``base``'s children only once no process is in ``base`` itself.
    :class:`Off` if the worker cannot move."""
    leaf = base / LEAF
    try:
        leaf.mkdir(exist_ok=True)
        write(leaf / "cgroup.procs", str(os.getpid() if me is None else me))
        for _ in range(3):  # what else is there: a previous worker's engine servers, a helper
            for pid in pids_in(base):
                try:
                    write(leaf / "cgroup.procs", str(pid))
                except ProcessLookupError:
                    continue
    except OSError as exc:
        raise Off(f"the worker could not move into {leaf}: {exc.strerror or exc}") from None


def enable(base: Path, controllers: frozenset[str]) -> frozenset[str]:
    """Enable ``controllers`` for ``base``'s children; those enabled (all, or what was
    already if the kernel refused: said)."""
    enabled = set((base / "cgroup.subtree_control").read_text().split())
    missing = sorted(controllers - enabled)
    if missing:
        try:
            write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
        except OSError as exc:
            log.warning(
                "cgroups.controllers_refused",
                controllers=missing,
                error=exc.strerror or str(exc),
                effect="runs get cgroups without limits",
            )
            return frozenset(enabled & controllers)
    return controllers


SWITCH: Final = (
    'cat >/dev/null; f="$0/cgroup.subtree_control"; '
    'for c in $(cat "$f"); do printf -- "-%s" "$c" > "$f"; done'
)
"""The dead man's switch (``sh -c SWITCH UNIT``): its stdin is a pipe from the worker; at
EOF (the worker is gone, however it died) it turns the unit's controllers off."""


@attrs.define
class Switch:
    """Why: systemd (before 254's ``DelegateSubgroup=``) starts a service's main process in
    the root of the unit's cgroup, and cgroup v2 refuses a process in a cgroup whose
    ``cgroup.subtree_control`` enables controllers (EBUSY). With ``KillMode=process`` the
    runs outlive a worker killed outright (SIGKILL, the watchdog, the OOM killer), their
    cgroups keep the unit's controllers on, and the restarted worker would fail with
    ``status=219/CGROUP`` (found in the VM test) until every run had ended. So a tiny
    process beside the worker, in its own session, turns the controllers off as soon as
    the worker is gone; the runs go on in their cgroups (identity, ``cgroup.kill``) without
    their limits until the next worker turns them on again and re-applies each adopted
    run's limits from the ledger."""

    process: subprocess.Popen[bytes] | None = None

    def arm(self, unit: Path) -> None:
        self.process = subprocess.Popen(
            ["/bin/sh", "-c", SWITCH, str(unit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
            start_new_session=True,  # out of the worker's group: its signals are not the switch's
        )
        reaper.CHILDREN.spawned.add(self.process.pid)  # its own watcher reaps it

    async def watch(self, unit: Path) -> None:
        """Re-arm the switch if it ever exits while the worker lives (it should not)."""
        while self.process is not None:
            pid = self.process.pid
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # no pidfd: look every second
                while self.process.poll() is None:
                    await trio.sleep(1)
            else:
                try:
                    await trio.lowlevel.wait_readable(fd)
                finally:
                    os.close(fd)
            status = self.process.wait()
            reaper.CHILDREN.spawned.discard(pid)
            log.warning("cgroups.switch_exited", status=status, effect="armed again")
            await trio.sleep(1)
            self.arm(unit)
