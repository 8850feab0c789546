"""Flows used by the end-to-end tests (run by `python -m prefect.engine` in the child)."""

import json
import os
import time

from prefect import flow


@flow
def hello(name: str = "world", out: str = "", sleep: float = 0.0) -> str:
    start = time.time()
    if sleep:
        time.sleep(sleep)
    print(f"hello {name} from flow-worker test")
    if out:
        record = {
            "name": name,
            "FOO": os.environ.get("FOO"),
            "BAR": os.environ.get("BAR"),
            "run_id": os.environ.get("PREFECT__FLOW_RUN_ID"),
            "start": start,
            "end": time.time(),
            "cwd": os.getcwd(),
        }
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return name


def _write_hook_marker(flow, flow_run, state) -> None:
    marker = flow_run.parameters.get("marker")
    if marker:
        with open(marker, "w") as f:
            f.write(f"{state.type.value}\n")


@flow(on_cancellation=[_write_hook_marker])
def cancellable(marker: str = "", sleep: float = 120.0) -> None:
    print("cancellable flow started", flush=True)
    time.sleep(sleep)


@flow
def fleet(marks: str, sleep: float = 0.0, first_sleep: float = 0.0) -> None:
    """Leaves one marker file per execution in ``marks`` (named by run id, pid and time);
    sleeps ``first_sleep`` on its first execution and ``sleep`` on any later one."""
    run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    earlier = [n for n in os.listdir(marks) if n.startswith(f"{run_id}.")]
    path = os.path.join(marks, f"{run_id}.{os.getpid()}.{time.time_ns()}")
    with open(path, "w") as f:
        f.write(json.dumps({"pid": os.getpid(), "start": time.time()}))
    time.sleep(sleep if earlier else max(sleep, first_sleep))


@flow
def hold(mib: int = 100, seconds: float = 10.0) -> None:
    """Holds ``mib`` MiB (touched, so resident) for ``seconds``."""
    block = b"x" * (mib * 1024 * 1024)
    time.sleep(seconds)
    del block


@flow
def measured(out: str, mib: int = 200, cpu: float = 2.0, seconds: float = 2.0) -> None:
    """Allocates ``mib`` MiB, burns ``cpu`` CPU-seconds, holds for ``seconds``, then writes
    what the kernel says of this process: its peak resident set and its CPU so far."""
    import resource

    block = b"x" * (mib * 1024 * 1024)
    began = time.process_time()
    while time.process_time() - began < cpu:
        pass
    time.sleep(seconds)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    with open(out, "w") as f:
        f.write(json.dumps({"hwm": hwm, "cpu": cpu_seconds, "held": len(block)}))


@flow
def introspect(out: str) -> None:
    """Writes what a run's process looks like from inside (warm and cold must agree)."""
    import logging
    import sys

    from prefect import get_run_logger
    from prefect.settings import get_current_settings

    logger = get_run_logger()
    logger.debug("a debug line from the introspect flow")
    try:
        import warm_probe_module  # only on the deployment's PYTHONPATH

        probe = warm_probe_module.VALUE
    except ImportError:
        probe = None
    record = {
        "sys_path": sys.path,
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "env": {k: os.environ.get(k) for k in ("PREFECT_LOGGING_LEVEL", "PYTHONPATH", "FOO")},
        "settings_logging_level": str(get_current_settings().logging.level),
        "prefect_logger_level": logging.getLogger("prefect").level,
        "run_logger_effective_level": logger.getEffectiveLevel(),
        "probe": probe,
        "session_leader": os.getsid(0) == os.getpid(),
        "group_leader": os.getpgid(0) == os.getpid(),
        "stdin": os.readlink("/proc/self/fd/0"),
        "main": sys.modules["__main__"].__dict__.get("__file__"),
        "modules": sorted(sys.modules),
    }
    with open(out, "w") as f:
        f.write(json.dumps(record))


@flow
def environment(out: str) -> None:
    """Writes the run's environment: ``os.environ``, and what the process was started with
    (``/proc/self/environ``: a warm run's is its engine server's)."""
    with open("/proc/self/environ", "rb") as f:
        entries = [entry.decode(errors="replace") for entry in f.read().split(b"\0") if b"=" in entry]
    started = dict(entry.split("=", 1) for entry in entries)
    with open(out, "w") as f:
        f.write(json.dumps({"environ": dict(os.environ), "started": started}))
