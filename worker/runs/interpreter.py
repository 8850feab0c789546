"""The engine's interpreter, checked once at start: does it have prefect?

The default command is ``<python> -m prefect.engine``, where ``python`` is a setting
defaulting to the worker's own interpreter. A worker installed in its own virtualenv
(the Debian package's ``/opt/flow-worker``) has no prefect, so forgetting ``python = …``
is the first thing a new user does; without this check every run would crash with a
bare "status code: 1". The check runs in a child (``CHECK_TIMEOUT``), off the start-up
path, and asks whether prefect can be found (not imported: see ``FIND_PREFECT``); runs of
the default command wait for its answer, and if the interpreter cannot
import prefect each such run is CRASHED with a message naming the setting, ``STATUS=``
and ``/health`` say so, and the worker keeps serving runs with their own ``command``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Final

import attrs
import structlog
import trio

from worker.process import reaper
from worker.rules import childenv
from worker.rules.workspace import InterpreterDirs

log = structlog.get_logger("flow_worker")
FIND_PREFECT: Final = (
    "import importlib.util, json, os, site, sys, sysconfig\n"
    "if importlib.util.find_spec('prefect') is None:\n"
    "    sys.exit('ModuleNotFoundError: No module named prefect')\n"
    "try:\n"  # where its own directories are: never a reason to refuse the interpreter
    "    p = sysconfig.get_paths()\n"
    "    s = [p.get('purelib'), p.get('platlib'), *site.getsitepackages(), site.getusersitepackages()]\n"
    "    r = lambda ds: sorted({os.path.realpath(d) for d in ds if isinstance(d, str) and d})\n"
    "    v = sys.version_info\n"
    "    print(json.dumps([r([p.get('stdlib'), p.get('platstdlib')]), r(s), f'python{v[0]}{v[1]}.zip']))\n"
    "except Exception:\n"
    "    pass\n"
)
"""What the child runs: finds prefect without importing it (~20 ms, not the ~1.5 CPU-s of
``import prefect``, which would slow the first runs on a small host), and says where the
interpreter's own directories are (kept off a run's ``PYTHONPATH``, ``launch.py``). A
prefect that is installed but broken is not caught here; its ImportError shows in the
run's crash message (the stderr tail) instead."""
CHECK_TIMEOUT: Final = 60.0
"""Seconds ``import prefect`` may take in the check: a cold disk can be slow, a hung
interpreter must not leave the worker waiting for ever."""


def unusable(python: str, why: str) -> str:
    """The message for runs and for /health: what is wrong and which setting fixes it."""
    return (
        f"the interpreter {python!r} cannot run the Prefect engine ({why}); set `python` in the "
        "worker's config file (or FLOW_WORKER_PYTHON) to an interpreter that has prefect and "
        "your flows' dependencies"
    )


@attrs.define
class InterpreterCheck:
    python: str = sys.executable
    done: trio.Event = attrs.Factory(trio.Event)
    problem: str | None = None
    """Set when the check failed: the message that CRASHED runs and /health carry."""
    dirs: InterpreterDirs | None = None
    """The interpreter's standard library and site-packages, once checked."""

    async def run(self) -> None:
        try:
            self.problem = await self._check()
        finally:
            self.done.set()
        if self.problem is not None:
            log.error("worker.interpreter_unusable", python=self.python, problem=self.problem)

    async def _check(self) -> str | None:
        argv = [self.python, "-c", FIND_PREFECT]
        try:
            with reaper.CHILDREN.spawning():  # its exit status is its own, never an orphan's
                proc = await trio.lowlevel.open_process(
                    argv,
                    env=childenv.inherited(os.environ),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                reaper.CHILDREN.spawned.add(proc.pid)
        except OSError as exc:
            return unusable(self.python, f"{type(exc).__name__}: {exc.strerror or exc}")
        try:
            assert proc.stderr is not None and proc.stdout is not None
            err = out = b""
            with trio.move_on_after(CHECK_TIMEOUT) as scope:
                async for chunk in proc.stderr:
                    err = (err + chunk)[-4096:]
                async for chunk in proc.stdout:
                    out = (out + chunk)[-65536:]
                await proc.wait()
            if scope.cancelled_caught:
                return unusable(self.python, f"`import prefect` took longer than {CHECK_TIMEOUT:g}s")
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                reaper.CHILDREN.spawned.discard(proc.pid)
        if proc.returncode == 0:
            self.dirs = _dirs(out)
            return None
        lines = [line for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
        return unusable(self.python, lines[-1] if lines else f"exit status {proc.returncode}")


def _dirs(out: bytes) -> InterpreterDirs | None:
    """The check's answer; None if it cannot be read (nothing is then kept off PYTHONPATH)."""
    try:
        stdlib, site, zip_name = json.loads(out)
        return InterpreterDirs(tuple(map(str, stdlib)), tuple(map(str, site)), str(zip_name))
    except (ValueError, TypeError):
        return None
