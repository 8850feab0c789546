"""The hook runner's process (``hook_runner.py``): spawned, followed, bounded in time, reaped.

A flow's ``on_crashed`` or ``on_cancellation`` hooks run after its process is gone, in a
process of their own (``runs/hooks.py`` decides when, and with what):

* **The run's runtime.** The run's interpreter (the argv before ``-m prefect.engine``), the
  run's merged environment, its working directory (or a fresh private temporary directory,
  removed afterwards), ``/dev/null`` as stdin. It is started with ``LOADER`` as the engine
  server is (``warm.py``), so the worker's package directory is not on its ``sys.path``.
  Always spawned cold: never forked from a warm engine server.
* **Its own session**, so all it starts can be killed with it.
* **Bounded.** The runner is told ``--timeout`` (it stops the hooks, says so in the run's
  logs and exits 8); ``KILL_MARGIN`` seconds later the worker kills its whole session.
  When it exits, whatever is left of its session is killed too, and it is always reaped
  (a worker that is stopping hard kills it first).
* **Output.** Its stdout is one JSON line (its result, read here); its stderr, where
  Prefect's console log, the flow module's and the hooks' prints go, is a file in the
  state directory followed into the worker's log as ``run.output`` lines of the run, as
  the run's own output is (``output.py``), and removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from worker.process import reaper
from worker.process.output import RunOutput
from worker.process.warm import LOADER

SCRIPT: Final = Path(__file__).with_name("hook_runner.py")
KILL_MARGIN: Final = 10.0
"""Seconds after ``--timeout`` before the worker kills the runner's session: the runner
needs a moment past its own deadline to say so in the run's logs and flush them (5 s)."""
MAX_REPORT: Final = 64 * 1024
"""The most of its stdout that is read (its one line is a few hundred bytes)."""
RESULTS: Final = {
    0: "ok",
    2: "usage",
    3: "no_hooks",
    4: "hook_failed",
    5: "load_failed",
    6: "api_failed",
    7: "not_crashed",
    8: "timed_out",
    9: "engine_ran",
}
"""``hook_runner.py``'s exit codes, for a runner that died before its JSON line."""


@attrs.frozen
class HookOutcome:
    """What one hook runner did."""

    result: str
    """``hook_runner.py``'s result (``ok``, ``no_hooks``, ``hook_failed`` …), or the
    worker's: ``killed`` (past ``timeout`` + ``KILL_MARGIN``), ``not_started``, ``failed``
    (it exited without saying why: a bug, or killed by a signal)."""
    returncode: int | None = None
    report: dict[str, Any] = attrs.Factory(dict)
    seconds: float = 0.0
    error: str = ""


def command(prefix: list[str], kind: str, flow_run_id: str, timeout: float, extra: list[str]) -> list[str]:
    """The runner's argv: the run's interpreter, ``-c LOADER``, the script and its arguments."""
    return [*prefix, "-c", LOADER, str(SCRIPT), kind, flow_run_id, "--timeout", f"{timeout:g}", *extra]


async def run_hooks(
    prefix: list[str],
    kind: str,
    flow_run_id: str,
    *,
    env: Mapping[str, str],
    cwd: Path | None,
    timeout: float,
    log: Any,
    err_path: Path,
    extra: list[str] | None = None,
) -> HookOutcome:
    """Run the flow's hooks of ``kind`` (``crashed`` or ``cancellation``) for one run, and
    say what happened. Returns once the runner is reaped; never raises but ``Cancelled``."""
    argv = command(prefix, kind, flow_run_id, timeout, list(extra or []))
    began = trio.current_time()
    tmpdir: str | None = None
    exited = trio.Event()
    try:
        if cwd is None or not cwd.is_dir():
            tmpdir = tempfile.mkdtemp(prefix="flow-worker-hooks-")
            cwd = Path(tmpdir)
        err_path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
        err = os.open(err_path, flags, 0o600)
    except OSError as exc:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return HookOutcome("not_started", error=f"its directory or {err_path}: {type(exc).__name__}: {exc}")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(RunOutput(log.bind(source="hooks")).follow, [(err_path, "err")], exited, False)
            try:
                return await _spawn_and_wait(argv, env, cwd, err, timeout, began)
            finally:
                exited.set()  # the follower reads what is left, then ends
    finally:
        err_path.unlink(missing_ok=True)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


async def _spawn_and_wait(
    argv: list[str], env: Mapping[str, str], cwd: Path, err: int, timeout: float, began: float
) -> HookOutcome:
    try:
        with reaper.CHILDREN.spawning():  # its exit status is its own, never an orphan's
            proc = await trio.lowlevel.open_process(
                argv,
                cwd=str(cwd),
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
            reaper.CHILDREN.spawned.add(proc.pid)
    except (OSError, ValueError, TypeError) as exc:
        return HookOutcome("not_started", error=f"{type(exc).__name__}: {exc}")
    finally:
        os.close(err)
    out = b""
    try:
        with trio.move_on_after(timeout + KILL_MARGIN) as scope:
            assert proc.stdout is not None
            async for chunk in proc.stdout:
                out = (out + chunk)[:MAX_REPORT]
            await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            _kill_session(proc.pid)  # past its time, or a hard stop; else only its leftovers
            await proc.wait()
            reaper.CHILDREN.spawned.discard(proc.pid)
            if proc.stdout is not None:
                await proc.stdout.aclose()
    seconds = round(trio.current_time() - began, 2)
    if scope.cancelled_caught:
        why = f"the hook runner did not finish within {timeout:g} s (+{KILL_MARGIN:g} s): killed"
        return HookOutcome("killed", proc.returncode, seconds=seconds, error=why)
    return outcome_of(out, proc.returncode, seconds)


def outcome_of(out: bytes, returncode: int | None, seconds: float) -> HookOutcome:
    """The outcome from the runner's stdout (its last JSON line) and its exit status."""
    report: dict[str, Any] = {}
    for line in reversed(out.decode("utf-8", "replace").splitlines()):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict) and "hook_runner" in found:
            report = found
            break
    if report.get("result"):
        result = str(report["result"])
    else:  # died before its line: its status says what it knew, if anything
        result = RESULTS.get(returncode, "failed") if returncode else "failed"
    error = str(report.get("error") or "")
    if result == "failed" and not error:
        error = f"the hook runner exited with status {returncode} without a result (see its stderr)"
    return HookOutcome(result, returncode, report, seconds, error)


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
