"""The hook runner: a flow's ``on_crashed`` or ``on_cancellation`` hooks, run after its process is gone.

This file runs in the *flow's* interpreter, not the worker's, so it imports nothing but the
standard library (and Prefect, once its arguments are read). The worker starts it like the
engine server (``warm.py``; ``hookproc.py`` spawns it, never forked warm)::

    <python> -c LOADER /path/to/hook_runner.py KIND FLOW_RUN_ID [--timeout S] [--message M]
        [--engine-reported]

with the run's own environment (the merged env the run was started with: API URL and key,
the worker's explicit Prefect settings, the job's ``env``), in a fresh directory (or the
job's ``working_dir``), where pull steps may write. ``KIND`` is ``crashed`` or
``cancellation``.

What it does, as Prefect's runner does (``prefect.runner._hook_runner``,
``prefect.runner.Runner._run_on_crashed_hooks``):

0. With ``--engine-reported`` (``crashed`` only: the engine itself wrote CRASHED, not the
   worker), does nothing if this Prefect is 3.8 or later (``engine_ran``): from 3.8 on,
   ``PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS=false`` gates only the cancellation
   hooks, so that engine already ran its ``on_crashed`` hooks; before 3.8 it gates both,
   and they are run here, once.
1. Reads the flow run from the API.
2. Picks the state the hooks get. ``crashed``: the run's current state, which must be
   CRASHED (anything else, say a run retried meanwhile, runs nothing: ``not_crashed``).
   ``cancellation``: the run's state if it is CANCELLING, else a ``Cancelling`` state made
   here (``--message``), as Prefect 3.9.1's cancellation manager does once it has killed
   the process.
3. Loads the flow as the engine does (``prefect.flow_engine.load_flow``): from
   ``PREFECT__FLOW_ENTRYPOINT`` if the environment names one, else from the flow run's
   deployment (``prefect.flows.load_flow_from_flow_run``: storage or pull steps, then the
   entrypoint), never as a placeholder (a placeholder has no hooks).
4. Runs each hook of that kind in order, called ``hook(flow=, flow_run=, state=)``; a sync
   hook in a thread, an async one awaited. A hook that raises is logged and the next one
   still runs. Each is said in the run's logs through Prefect's run logger
   (``prefect.flow_runs``), in Prefect's words: "Running hook 'x' in response to entering
   state 'Crashed'", "Hook 'x' finished running successfully", "An error was encountered
   while running hook 'x'" with the traceback.
5. Flushes the run's log lines to the API, writes one JSON line on stdout, and exits.

stdout carries exactly that one JSON line: while Prefect is imported and the hooks run,
file descriptor 1 points at stderr, so anything the flow's code or its hooks print (and
their subprocesses) goes to stderr. The line::

    {"hook_runner": 1, "kind": "crashed", "result": "ok", "flow_run_id": "...",
     "flow": "name", "state": "CRASHED", "hooks": [{"name": "h", "ok": true, "seconds": 0.01}],
     "error": null}

Exit codes (``result`` says the same):

==  ===============  ================================================================
0   ``ok``           one or more hooks ran and every one returned
3   ``no_hooks``     the flow loaded and has no hooks of this kind: nothing ran
4   ``hook_failed``  one or more hooks raised (the others still ran)
5   ``load_failed``  the flow could not be loaded (no deployment or entrypoint, a pull
                     step or the import failed, Prefect itself did not import)
6   ``api_failed``   the flow run could not be read from the API
7   ``not_crashed``  ``crashed`` was asked but the run is not CRASHED: nothing ran
8   ``timed_out``    ``--timeout`` (counted from this process's start: the loading of
                     the flow too) passed before the hooks were done (said in the run's
                     logs; the process then exits at once, a sync hook's thread with it)
9   ``engine_ran``   ``--engine-reported`` and a Prefect ≥ 3.8: its engine ran them
2   ``usage``        bad arguments
1                    anything else: a bug here (traceback on stderr, no JSON line)
==  ===============  ================================================================
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import sys
import time
import traceback
from typing import Any

PROTOCOL = 1
EXIT = {
    "ok": 0,
    "usage": 2,
    "no_hooks": 3,
    "hook_failed": 4,
    "load_failed": 5,
    "api_failed": 6,
    "not_crashed": 7,
    "timed_out": 8,
    "engine_ran": 9,
}
ENGINE_RUNS_CRASHED_HOOKS = (3, 8)
"""From this Prefect on, the engine runs ``on_crashed`` hooks even with the switch off."""
FLUSH_TIMEOUT = 5.0
"""How long the run's log lines may take to reach the API at the end (the worker kills the
runner ``hookproc.KILL_MARGIN`` seconds after ``--timeout``: this must fit in it)."""
STARTED = time.monotonic()


class Outcome(Exception):
    """Ends the run early with ``result`` (a key of ``EXIT``) and why."""

    def __init__(self, result: str, error: str) -> None:
        super().__init__(error)
        self.result = result
        self.error = error


def _argv() -> list[str]:
    # `python -c LOADER path args...` leaves sys.argv == ["-c", path, args...];
    # `python hook_runner.py args...` leaves sys.argv == [path, args...].
    return sys.argv[2:] if sys.argv and sys.argv[0] == "-c" else sys.argv[1:]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hook_runner.py", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("crashed", "cancellation"))
    parser.add_argument("flow_run_id")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds from this process's start for loading the flow and all its hooks (default: none)",
    )
    parser.add_argument(
        "--engine-reported",
        action="store_true",
        help="the engine wrote CRASHED itself: run nothing on a Prefect that ran the hooks then (>= 3.8)",
    )
    parser.add_argument(
        "--message",
        default="Flow run was cancelled.",
        help="message of the Cancelling state made when the run is no longer CANCELLING",
    )
    return parser.parse_args(argv)


def _release(version: str) -> tuple[int, int]:
    """``"3.8.8"`` → ``(3, 8)``; a version that does not read so counts as ``(0, 0)``."""
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or "0")
    except (IndexError, ValueError):
        return (0, 0)


def _hook_name(hook: Any) -> str:
    name = getattr(hook, "__name__", None)
    if name:
        return str(name)
    func = getattr(hook, "func", None)  # functools.partial
    if func is not None and getattr(func, "__name__", None):
        return str(func.__name__)
    return type(hook).__name__


class HookRunner:
    def __init__(self, args: argparse.Namespace, result_fd: int) -> None:
        self.args = args
        self.result_fd = result_fd
        self.report: dict[str, Any] = {
            "hook_runner": PROTOCOL,
            "kind": args.kind,
            "flow_run_id": args.flow_run_id,
            "flow": None,
            "state": None,
            "hooks": [],
            "error": None,
        }
        self.logger: Any = None
        self.deadline = None if args.timeout is None else STARTED + args.timeout

    def _left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    async def run(self) -> str:
        try:
            result = await self._run()
        except Outcome as outcome:
            self.report["error"] = outcome.error
            result = outcome.result
        await self._flush_logs()
        if result == "timed_out":
            # A sync hook's thread may still be running, and leaving asyncio.run would
            # wait for it: say the outcome and exit now, the thread with us.
            _finish(self.report, result, self.result_fd)
            os._exit(EXIT[result])
        return result

    async def _run(self) -> str:
        from uuid import UUID

        try:
            import prefect.main  # what `from prefect import flow` does: logging set up
            from prefect.client.orchestration import get_client
            from prefect.logging.loggers import flow_run_logger
        except Exception as exc:
            raise Outcome("load_failed", f"Prefect did not import: {exc!r}") from exc

        version = str(getattr(prefect, "__version__", "0"))
        if (
            self.args.engine_reported
            and self.args.kind == "crashed"
            and _release(version) >= ENGINE_RUNS_CRASHED_HOOKS
        ):
            raise Outcome("engine_ran", f"the engine (Prefect {version}) ran its on_crashed hooks itself")

        try:
            flow_run_id = UUID(self.args.flow_run_id)
        except ValueError:
            raise Outcome("usage", f"not a flow run id: {self.args.flow_run_id!r}") from None

        try:
            async with get_client() as client:
                flow_run = await client.read_flow_run(flow_run_id)
        except Exception as exc:
            raise Outcome("api_failed", f"could not read flow run {flow_run_id}: {exc!r}") from exc

        state = self._state_for(flow_run)
        self.report["state"] = state.type.value
        self.logger = flow_run_logger(flow_run)

        try:
            flow = await asyncio.wait_for(self._load_flow(flow_run), self._left())
        except (asyncio.TimeoutError, TimeoutError) as exc:  # noqa: UP041  (distinct before 3.11)
            self.logger.error(
                "Loading the flow for its on_%s hooks did not finish within %s s",
                self.args.kind,
                self.args.timeout,
            )
            raise Outcome("timed_out", f"loading the flow took more than {self.args.timeout} s") from exc
        except Exception as exc:
            # Prefect's runner says the same (`Runner._run_on_crashed_hooks`, `HookRunner`).
            self.logger.warning(
                "Runner failed to retrieve flow to execute on_%s hooks for flow run %r.",
                self.args.kind,
                str(flow_run.id),
                exc_info=True,
            )
            raise Outcome("load_failed", f"{type(exc).__name__}: {exc}") from exc
        self.report["flow"] = getattr(flow, "name", None)

        hooks = list(
            (flow.on_crashed_hooks if self.args.kind == "crashed" else flow.on_cancellation_hooks) or []
        )
        if not hooks:
            return "no_hooks"
        self.logger = flow_run_logger(flow_run, flow)
        return await self._run_hooks(hooks, flow, flow_run, state)

    def _state_for(self, flow_run: Any) -> Any:
        state = flow_run.state
        if self.args.kind == "crashed":
            if state is None or not state.is_crashed():
                what = state.type.value if state is not None else "no state"
                raise Outcome("not_crashed", f"the flow run is {what}, not CRASHED")
            return state
        if state is not None and state.is_cancelling():
            return state
        from prefect.states import Cancelling

        return Cancelling(message=self.args.message)

    async def _load_flow(self, flow_run: Any) -> Any:
        from prefect.flows import load_flow_from_entrypoint, load_flow_from_flow_run

        entrypoint = os.environ.get("PREFECT__FLOW_ENTRYPOINT")
        if not entrypoint:
            if flow_run.deployment_id is None:
                raise ValueError("the flow run has no deployment and no PREFECT__FLOW_ENTRYPOINT is set")
            # Storage or pull steps, then the entrypoint: what the engine does (client injected).
            return await load_flow_from_flow_run(flow_run, use_placeholder_flow=False)

        def from_entrypoint() -> Any:
            from prefect.exceptions import MissingFlowError

            try:
                return load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
            except MissingFlowError:
                import prefect.flows

                convert = getattr(prefect.flows, "load_function_and_convert_to_flow", None)  # 3.2+
                if convert is None:
                    raise
                return convert(entrypoint)

        return await asyncio.to_thread(from_entrypoint)

    async def _run_hooks(self, hooks: list[Any], flow: Any, flow_run: Any, state: Any) -> str:
        deadline = self.deadline
        failed = False
        for hook in hooks:
            name = _hook_name(hook)
            record: dict[str, Any] = {"name": name, "ok": False, "seconds": 0.0}
            self.report["hooks"].append(record)
            self.logger.info("Running hook %r in response to entering state %r", name, state.name)
            began = time.monotonic()
            try:
                call = self._call(hook, flow, flow_run, state)
                if deadline is None:
                    await call
                else:
                    await asyncio.wait_for(call, max(0.0, deadline - time.monotonic()))
            except (asyncio.TimeoutError, TimeoutError) as exc:  # noqa: UP041  (distinct before 3.11)
                if deadline is not None and time.monotonic() >= deadline:
                    record["seconds"] = round(time.monotonic() - began, 3)
                    self.logger.error(
                        "Hook %r did not finish within %s s; the hooks' time is up", name, self.args.timeout
                    )
                    raise Outcome(
                        "timed_out", f"hook {name!r} did not finish within {self.args.timeout} s"
                    ) from exc
                failed = self._failed(record, name)
            except BaseException as exc:  # a hook's sys.exit() must not end the runner
                if isinstance(exc, KeyboardInterrupt):
                    raise
                failed = self._failed(record, name)
            else:
                record["ok"] = True
                self.logger.info("Hook %r finished running successfully", name)
            record["seconds"] = round(time.monotonic() - began, 3)
        return "hook_failed" if failed else "ok"

    def _failed(self, record: dict[str, Any], name: str) -> bool:
        record["error"] = traceback.format_exc(limit=-3).strip().splitlines()[-1]
        self.logger.error("An error was encountered while running hook %r", name, exc_info=True)
        return True

    @staticmethod
    async def _call(hook: Any, flow: Any, flow_run: Any, state: Any) -> None:
        if inspect.iscoroutinefunction(hook):
            await hook(flow=flow, flow_run=flow_run, state=state)
            return
        # A sync hook (or an object whose __call__ is async: its coroutine is awaited here).
        result = await asyncio.to_thread(hook, flow=flow, flow_run=flow_run, state=state)
        if inspect.isawaitable(result):
            await result

    async def _flush_logs(self) -> None:
        if "prefect.logging.handlers" not in sys.modules:
            return
        try:
            from prefect.logging.handlers import APILogHandler

            await asyncio.wait_for(APILogHandler.aflush(), FLUSH_TIMEOUT)
        except Exception as exc:
            print(
                f"hook_runner: the run's log lines may not all have reached the API: {exc!r}", file=sys.stderr
            )


def main() -> None:
    try:
        args = _parse(_argv())
    except SystemExit as exc:
        sys.exit(EXIT["usage"] if exc.code else 0)

    # fd 1 is the worker's: one JSON line. Everything else (Prefect, the flow's module,
    # the hooks and their children) prints to stderr.
    sys.stdout.flush()
    result_fd = os.dup(1)
    os.dup2(2, 1)

    runner = HookRunner(args, result_fd)
    result = asyncio.run(runner.run())
    _finish(runner.report, result, result_fd)
    sys.exit(EXIT[result])


def _finish(report: dict[str, Any], result: str, result_fd: int) -> None:
    """Write the one JSON line to the worker's stdout."""
    report["result"] = result
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(result_fd, (json.dumps(report) + "\n").encode())
    os.close(result_fd)


if __name__ == "__main__":
    main()
