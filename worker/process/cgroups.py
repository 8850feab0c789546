"""Per-run cgroups: each run in a cgroup of its own below the worker's delegated subtree.

Theory of operation
-------------------
systemd gives a unit with ``Delegate=yes`` its cgroup (v2) to manage: the worker's user owns
the directory, its ``cgroup.procs`` and ``cgroup.subtree_control``. At start
(:meth:`Cgroups.start`) the worker checks that it has that (``delegated.detect``: a pure
v2 hierarchy, a cgroup of its own that is not the root, delegated to it and writable, the
controllers there), moves itself, and anything else still in the unit's cgroup, into the
leaf ``<unit>/worker`` (cgroup v2 allows controllers below a cgroup only when no process
is in it), arms the dead man's switch (``delegated.Switch``) and enables ``cpu``,
``memory`` and ``pids`` for the unit's children. Each run then lives in
``<unit>/run-<flow-run-id>``, a sibling of the worker's leaf (:class:`RunCgroup`):

* **made before the run's first instruction**: the directory and its limits
  (``runlimits.RunLimits.files``, plus ``memory.oom.group``: an OOM kill ends the whole
  run) are written first, then the run's process is moved in before it runs anything of
  the flow (``placed.py`` for a spawn, the engine server's go for a warm fork);
* **its identity and kill switch**: ``cgroup.kill`` ends every process in it whatever its
  session or environment, when the run is stopped after its grace period and whenever its
  main process has exited (as systemd ends a unit's leftovers);
* **its exact cost**: ``memory.peak``, ``cpu.stat``'s ``usage_usec`` and ``memory.events``'
  ``oom_kill``, read once it is empty (:class:`Figures`), and then it is removed;
* **found again** by a restarted worker (:meth:`Cgroups.found`): the runs it adopts keep
  their cgroups; a cgroup no run is adopted with is emptied and removed.

Without such a subtree (cgroup v1 or hybrid hosts, most containers, not a service with
``Delegate=yes``) everything works as before (process groups, the environment sweep,
``/proc`` sampling), said once at start in one line (``cgroups.off`` with the reason), and
a run's limits are said as not applied in that run's logs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Final

import attrs
import structlog
import trio

from worker.process.delegated import ROOT, SELF, WANTED, Off, Switch, detect, enable, move_in, pids_in, write
from worker.rules import runlimits
from worker.rules.runlimits import RunLimits

log = structlog.get_logger("flow_worker")

PREFIX: Final = "run-"
EMPTY_TIMEOUT: Final = 10.0
"""How long a killed cgroup may take to empty (processes in uninterruptible sleep) before
it is left for the next start to remove."""


def _flat(text: str) -> dict[str, int]:
    """A flat-keyed cgroup file (``memory.events``, ``cpu.stat``) as numbers."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@attrs.frozen
class Figures:
    """What a run's cgroup says it cost, read once it is empty."""

    peak: int | None = None
    """``memory.peak``: the most memory the run's processes used together (bytes)."""
    cpu_seconds: float | None = None
    """``cpu.stat``'s ``usage_usec``: every CPU second its processes took."""
    oom_kills: int = 0
    """``memory.events``' ``oom_kill``: processes of the run the OOM killer ended."""


@attrs.define(eq=False)
class RunCgroup:
    """One run's cgroup: ``<unit>/run-<flow-run-id>``."""

    path: Path
    limits: RunLimits = attrs.Factory(RunLimits)
    """The limits written to it."""

    @property
    def run_id(self) -> str:
        return self.path.name.removeprefix(PREFIX)

    def place(self, pid: int) -> None:
        """Move ``pid`` into it (OSError if the kernel refuses)."""
        write(self.path / "cgroup.procs", str(pid))

    def contains(self, pid: int) -> bool:
        text = _read(Path(f"/proc/{pid}/cgroup")) or ""
        return text.strip().endswith(f"/{self.path.name}")

    def pids(self) -> list[int]:
        return pids_in(self.path)

    def populated(self) -> bool:
        """Whether a process (or a descendant cgroup's) is in it; False once it is gone."""
        return _flat(_read(self.path / "cgroup.events") or "").get("populated", 0) == 1

    def kill(self) -> None:
        """SIGKILL every process in it (``cgroup.kill``, or one by one before Linux 5.14)."""
        try:
            write(self.path / "cgroup.kill", "1")
            return
        except FileNotFoundError:
            if not self.path.is_dir():
                return
        except OSError:
            pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _number(self, name: str) -> int | None:
        text = (_read(self.path / name) or "").strip()
        return int(text) if text.isdigit() else None

    def memory_now(self) -> int | None:
        """``memory.current``: what the run's processes use now (bytes)."""
        return self._number("memory.current")

    def memory_max(self) -> int | None:
        """``memory.max`` as written (None: ``max``, or no memory controller)."""
        return self._number("memory.max")

    def figures(self) -> Figures:
        usage = _flat(_read(self.path / "cpu.stat") or "").get("usage_usec")
        return Figures(
            peak=self._number("memory.peak"),
            cpu_seconds=usage / 1e6 if usage is not None else None,
            oom_kills=_flat(_read(self.path / "memory.events") or "").get("oom_kill", 0),
        )

    async def end(self, timeout: float = EMPTY_TIMEOUT) -> tuple[Figures, bool]:
        """Kill what is left in it, wait until it is empty, read its figures, remove it.
        Its figures, and whether it is gone (False: still not empty after ``timeout``)."""
        pause = 0.01
        with trio.move_on_after(timeout):
            while self.populated():
                self.kill()
                await trio.sleep(pause)
                pause = min(pause * 2, 0.2)
        figures = self.figures()
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            return figures, False
        return figures, True

    def remove(self) -> None:
        """Remove it if empty (a run that never started in it)."""
        try:
            self.path.rmdir()
        except OSError:
            pass


@attrs.define
class Cgroups:
    """The worker's delegated subtree: on (``unit`` is set) or off (``reason`` says why)."""

    unit: Path | None = None
    controllers: frozenset[str] = frozenset()
    reason: str = ""
    switch: Switch = attrs.Factory(Switch)

    async def watch(self) -> None:
        """The supervisor's task for the dead man's switch (nothing to do when off)."""
        if self.unit is not None:
            await self.switch.watch(self.unit)

    @classmethod
    def start(
        cls, enabled: bool = True, service: bool = True, root: Path = ROOT, proc: Path = SELF
    ) -> Cgroups:
        """Find the delegated subtree and move the worker into its leaf; said in one line."""
        try:
            if not enabled:
                raise Off("turned off (cgroups = false)")
            try:
                text = proc.read_text()
            except OSError as exc:
                raise Off(f"cannot read {proc}: {exc.strerror}") from None
            base, offered = detect(text, service, root)
            move_in(base)
            cgroups = cls(unit=base)
            try:
                cgroups.switch.arm(base)  # before the controllers go on: see Switch
            except OSError as exc:
                raise Off(f"cannot start the dead man's switch (/bin/sh): {exc.strerror or exc}") from None
        except Off as exc:
            log.info("cgroups.off", reason=str(exc), effect="runs are tracked by process group and /proc")
            return cls(reason=str(exc))
        cgroups.controllers = enabled_now = enable(base, offered)
        missing = [c for c in WANTED if c not in enabled_now]
        log.info(
            "cgroups.on",
            cgroup=str(base),
            controllers=sorted(enabled_now),
            **({"not_delegated": missing} if missing else {}),
        )
        return cgroups

    @property
    def on(self) -> bool:
        return self.unit is not None

    def make(self, run_id: str, limits: RunLimits, run_log: Any) -> RunCgroup | None:
        """The run's cgroup with its limits written, or None (off, or it cannot be made).
        A limit not applied is said in the run's log (``run.limits_not_applied``); the run
        goes on without it."""
        if self.unit is None:
            self.not_applied(run_log, limits, list(limits.items()), self.reason)
            return None
        cgroup = RunCgroup(self.unit / f"{PREFIX}{run_id}", limits)
        try:
            cgroup.path.mkdir(exist_ok=True)
        except OSError as exc:
            reason = f"cannot make {cgroup.path}: {exc.strerror or exc}"
            run_log.warning("run.not_in_cgroup", reason=reason)
            self.not_applied(run_log, limits, list(limits.items()), reason)
            return None
        self.apply(cgroup, limits, run_log)
        return cgroup

    def apply(self, cgroup: RunCgroup, limits: RunLimits, run_log: Any) -> None:
        """Write ``limits`` to the run's cgroup (and ``memory.oom.group``: an OOM kill ends
        the whole run); what cannot be written is said in the run's log."""
        cgroup.limits = limits
        refused: dict[str, str] = {}
        for name, (text, limit) in limits.files().items():
            controller = runlimits.CONTROLLER[limit]
            if controller not in self.controllers:
                refused[limit] = f"the {controller} controller is not delegated to the worker"
                continue
            try:
                write(cgroup.path / name, text)
            except OSError as exc:
                refused[limit] = f"{name}: {exc.strerror or exc}"
        if "memory" in self.controllers:
            try:
                write(cgroup.path / "memory.oom.group", "1")
            except OSError:
                pass  # (before Linux 4.19: the OOM killer takes one process, the run ends by its exit)
        for limit, reason in refused.items():
            self.not_applied(run_log, limits, [limit], reason)

    @staticmethod
    def not_applied(run_log: Any, limits: RunLimits, names: list[str], reason: str) -> None:
        if names:
            run_log.warning(
                "run.limits_not_applied",
                limits=limits.describe(names),
                reason=reason,
                effect="the run goes on without them",
            )

    def found(self) -> dict[str, RunCgroup]:
        """The runs' cgroups in the subtree now (a previous worker's), by flow run id."""
        if self.unit is None:
            return {}
        try:
            entries = list(self.unit.iterdir())
        except OSError:
            return {}
        found = {}
        for entry in entries:
            if entry.name.startswith(PREFIX) and entry.is_dir():
                cgroup = RunCgroup(entry)
                cgroup.limits = RunLimits(memory_max=cgroup.memory_max())  # for an OOM's message
                found[cgroup.run_id] = cgroup
        return found
