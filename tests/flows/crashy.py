"""Flows whose process dies, and flows that are cancelled, each with hooks that leave a marker
line (``TYPE|name|first line of message|cwd``) and a line in the run's logs (issue 21's tests)."""

import ctypes
import os
import signal
import time

from prefect import flow
from prefect.logging.loggers import flow_run_logger


def _die(how: str) -> None:
    if how == "exit3":
        os._exit(3)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer sends
    if how == "segv":
        ctypes.string_at(0)
    if how == "exit0":
        os._exit(0)
    if how == "raise_crash":
        raise KeyboardInterrupt("the engine reports this as a crash itself")
    if how == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if how in ("sleep", "ignore_term"):
        time.sleep(600)


def write_marker(flow, flow_run, state):
    """Appends one line to the run's ``marker`` file and says so in the run's logs."""
    hook_sleep = float(flow_run.parameters.get("hook_sleep") or 0)
    if hook_sleep:
        time.sleep(hook_sleep)
    message = (state.message or "").splitlines()[0] if state.message else ""
    with open(flow_run.parameters["marker"], "a") as f:
        f.write(f"{state.type.value}|{state.name}|{message}|{os.getcwd()}\n")
    flow_run_logger(flow_run, flow).info("hook write_marker saw %s", state.name)
    print("write_marker printed this", flush=True)


@flow(on_crashed=[write_marker])
def crashy(marker: str, how: str = "exit3", delay: float = 0.0, hook_sleep: float = 0.0) -> None:
    print("crashy started", flush=True)
    time.sleep(delay)
    _die(how)


@flow(on_cancellation=[write_marker])
def cancellable(marker: str, how: str = "sleep", hook_sleep: float = 0.0) -> None:
    print("cancellable started", flush=True)
    _die(how)


@flow
def plain(marker: str = "", how: str = "exit3") -> None:
    _die(how)
