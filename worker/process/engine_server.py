"""The engine server: Prefect imported once, one forked child per flow run (``warm_start``).

This file runs in the *flow's* interpreter, not the worker's, so it imports nothing but
the standard library (and Prefect). The worker starts it lazily (``warm.py``) as::

    <python> -c LOADER /path/to/engine_server.py

(``LOADER`` execs this file: with ``-c``, ``sys.path[0]`` is the empty string rather than
the worker package's directory, whose modules must not shadow anything the flow imports.)

Theory of operation
-------------------
1. **Preload.** Import ``prefect.engine``, ``prefect.flow_engine`` and ``ALSO_PRELOADED``
   (the ~1 s of CPU and ~80 MiB every cold ``python -m prefect.engine`` pays), check that the process
   holds no threads and no sockets (a fork copies neither correctly), ``gc.freeze()``
   (the collector, off during the imports, then never writes to the shared pages; it is
   on again in each run), note the mtime of every
   ``sys.path`` directory, and say ``{"ready": true, ...}`` on stdout. Any failure is
   said as ``{"ready": false, "error": ...}`` and the server exits: the worker starts
   those runs cold.
2. **Serve.** Each line on stdin is a run: ``{"id", "argv", "cwd", "env", "stdout",
   "stderr"}``. If a ``sys.path`` directory changed since the preload (a ``pip
   install``), the answer is ``{"id", "error": "stale: ..."}`` and the server exits, so
   no run gets yesterday's packages. Otherwise the server forks twice: the intermediate
   child forks the run's process, writes its pid to a pipe and exits at once, so the
   run's process is re-parented to the nearest child subreaper, the worker. The worker
   is then its parent like a spawned child's: it reads the true exit status itself,
   and the run does not depend on this server staying alive. The answer is ``{"id",
   "pid"}``; the run's process waits on a pipe until the worker, having recorded the
   pid, answers ``{"go": id}``. If the worker gave up on the answer (and killed this
   server) or is gone, the pipe closes and the process exits having run nothing, so a
   run the worker then starts cold never runs twice. EOF on stdin ends the server.
3. **Become the run.** The run's process starts its own session, takes ``/dev/null`` as
   stdin and the run's output files as stdout/stderr, closes every other descriptor,
   moves to the run's directory, takes the run's environment, gets the ``sys.path`` a
   cold ``python -m`` would have there (the directory first, then ``PYTHONPATH``'s
   entries made absolute, then the interpreter's own, duplicates dropped), refreshes
   Prefect's settings and logging from that environment, and runs ``prefect.engine`` as
   ``__main__`` exactly as ``-m`` does (``runpy._run_module_as_main``). It ends through
   the interpreter's normal exit, so atexit handlers and log flushing run as cold.

What the worker keys a server by (``startkey.start_key``): the resolved interpreter and every
environment variable read when an interpreter starts (``PYTHON*`` but ``PYTHONPATH``,
``LC_*``, ``LANG``, ``LD_*``, ``HOME``, ``TZ``); a run that differs there gets another
server. Known and accepted differences from a cold start: the hash seed is the server's
(``PYTHONHASHSEED``-style set ordering is shared by the server's runs), ``/proc/PID/cmdline``
and ``/proc/PID/environ`` show the server's start (the run's environment is in
``os.environ`` and in every process the flow starts), and import-time warnings of Prefect
are printed by the server, not in the run's output.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
from typing import Any

PROTOCOL = 1
ALSO_PRELOADED = (
    "prefect.runner",
    "prefect.deployments.steps",
    "anyio._backends._asyncio",
    "pydantic.v1",
    "encodings.idna",
    "rich._emoji_codes",
)
"""Modules every run of the engine imports after it starts (loading the flow run, the pull
steps, the API client, parameter validation, the console). Imported by the server, they
are shared by every run instead of copied into each. None reads the environment when it is
imported. Best effort: one that does not import here is imported by the run, as cold."""
NOT_STARTED = 75
"""The exit status of a forked process the worker never told to go (EX_TEMPFAIL)."""


def _send(message: dict[str, Any]) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


class _Lines:
    """Lines from a file descriptor, read without Python's buffering (nothing buffered
    here is inherited by a forked run)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    def next(self) -> bytes | None:
        while b"\n" not in self.buffer:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line


def _held_resources() -> list[str]:
    """Threads and sockets this process holds (a fork would copy them half-working)."""
    problems = []
    if "threading" in sys.modules:
        import threading

        others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        if others:
            problems.append("threads " + ", ".join(sorted(others)))
    sockets = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                sockets += 1
        except OSError:
            continue
    if sockets:
        problems.append(f"{sockets} socket(s)")
    return problems


def _path_mtimes() -> dict[str, int]:
    mtimes: dict[str, int] = {}
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            try:
                mtimes[entry] = os.stat(entry).st_mtime_ns
            except OSError:
                continue
    return mtimes


def _preload() -> dict[str, Any]:
    """Import the engine; the ready message, or why this interpreter cannot serve warm."""
    try:
        prefect = importlib.import_module("prefect")
        context = importlib.import_module("prefect.context")
        importlib.import_module("prefect.engine")
        importlib.import_module("prefect.flow_engine")
        logging_configuration = importlib.import_module("prefect.logging.configuration")
    except BaseException as exc:
        return {"ready": False, "error": f"preloading Prefect failed: {type(exc).__name__}: {exc}"}
    version = getattr(prefect, "__version__", "?")
    if not hasattr(context, "refresh_global_settings_context"):
        return {
            "ready": False,
            "error": f"Prefect {version} has no prefect.context.refresh_global_settings_context "
            "(3.6 and later have it): its settings cannot be refreshed for a run",
        }
    if not hasattr(logging_configuration, "setup_logging") or not hasattr(
        logging_configuration, "PROCESS_LOGGING_CONFIG"
    ):
        return {"ready": False, "error": f"Prefect {version}'s logging cannot be set up again for a run"}
    for name in ALSO_PRELOADED:
        try:
            importlib.import_module(name)
        except Exception:
            continue  # not preloaded: the run imports it itself, as a cold one does
    sys.modules.pop("prefect.engine", None)  # -m runs it afresh as __main__, as cold
    held = _held_resources()
    if held:
        return {"ready": False, "error": "the preloaded process holds " + " and ".join(held)}
    # Python's advice for fork without exec: the collector was off during the imports (no
    # freed holes in pages that runs then fill, copying them), and what was imported is
    # frozen out of every later collection (no run writes to it to collect it).
    gc.freeze()
    return {"ready": True, "prefect": version, "pid": os.getpid(), "protocol": PROTOCOL}


def _fork_run() -> tuple[int, int] | None:
    """Fork the run's process (through an intermediate child, see the theory above).

    Returns its pid and the write end of its go pipe in the server, and None in the run's
    process itself, once it was told to go (it exits if the server closes the pipe first)."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    intermediate = os.fork()
    if intermediate == 0:
        os.close(r)
        try:
            if os.fork() != 0:
                os._exit(0)
        except BaseException:
            os._exit(1)
        # the run's process: its own session first, so the pid the worker gets is a group
        try:
            os.close(go_w)
            os.setsid()
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            go = os.read(go_r, 1)
            os.close(go_r)
        except BaseException:  # never a second server: this process only ever runs a flow
            os._exit(NOT_STARTED)
        if go != b"g":
            os._exit(NOT_STARTED)  # the worker never took the run: nothing was run
        return None
    os.close(w)
    os.close(go_r)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    os.waitpid(intermediate, 0)
    if not data:
        os.close(go_w)
        raise OSError("the intermediate child could not fork")
    return int(data), go_w


def _serve() -> dict[str, Any]:
    """Answer run requests until EOF; return the request in a forked run's process."""
    mtimes = _path_mtimes()
    lines = _Lines(0)
    while True:
        line = lines.next()
        if line is None:
            os._exit(0)  # the worker is gone (its end of the pipe closed)
        request: dict[str, Any] = json.loads(line)
        changed = [p for p, m in mtimes.items() if _mtime(p) != m]
        if changed:
            _send({"id": request["id"], "error": f"stale: {changed[0]} changed since the preload"})
            os._exit(0)
        try:
            forked = _fork_run()
        except OSError as exc:
            _send({"id": request["id"], "error": f"fork failed: {exc}"})
            continue
        if forked is None:
            return request
        pid, go = forked
        _send({"id": request["id"], "pid": pid})
        answer = lines.next()  # the worker registered the pid: {"go": id}, else it is gone
        if answer is not None and json.loads(answer).get("go") == request["id"]:
            os.write(go, b"g")
        os.close(go)
        if answer is None:
            os._exit(0)


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _dedupe(paths: list[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for entry in paths:
        key = os.path.normcase(entry)
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out


def run_path(cwd: str, env: dict[str, str], base: list[str]) -> list[str]:
    """The ``sys.path`` of ``python -m`` started in ``cwd`` with ``env``: the directory,
    then ``PYTHONPATH``'s entries (an empty entry is the directory), made absolute, then
    the interpreter's own entries ``base``; duplicates after the first are dropped."""
    extra = env.get("PYTHONPATH") or ""
    entries = [os.path.abspath(os.path.join(cwd, p)) for p in extra.split(os.pathsep)] if extra else []
    return [cwd, *_dedupe(entries + base)]


def _become_run(request: dict[str, Any], base: list[str]) -> None:
    """In the run's process (its own session already): take the run's files, directory
    and environment."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    for fd, path in ((1, request.get("stdout")), (2, request.get("stderr"))):
        if path:
            target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)  # made 0600 by the worker
            os.dup2(target, fd)
            os.close(target)
        else:
            os.dup2(null, fd)
    os.close(null)
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass  # the directory's own descriptor, already closed
    cwd = request["cwd"]
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[:] = run_path(os.getcwd(), request["env"], base)
    importlib.invalidate_caches()
    gc.enable()
    argv = request["argv"]
    sys.argv[:] = ["-m", *argv[3:]]
    if hasattr(sys, "orig_argv"):
        sys.orig_argv[:] = argv

    context = importlib.import_module("prefect.context")
    logging_configuration = importlib.import_module("prefect.logging.configuration")
    context.refresh_global_settings_context()
    logging_configuration.PROCESS_LOGGING_CONFIG.clear()
    logging_configuration.setup_logging()


def main() -> None:
    gc.disable()  # until the run's process starts (see _preload)
    base = sys.path[1:]  # without -c's '' (the server's own directory, '/')
    ready = _preload()
    _send(ready)
    if not ready["ready"]:
        os._exit(0)
    request = _serve()
    _become_run(request, base)


if __name__ == "__main__":
    main()
    del main
    import runpy

    runpy._run_module_as_main("prefect.engine", alter_argv=True)  # type: ignore[attr-defined]  # what -m calls
