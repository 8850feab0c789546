"""Starting a run's process inside its cgroup, before it runs anything of the flow.

Linux can start a process directly in a cgroup (``clone3`` with ``CLONE_INTO_CGROUP``), but
Python 3.11's ``subprocess`` cannot ask for it, and the usual alternatives each have a
flaw: a ``preexec_fn`` that writes ``cgroup.procs`` runs Python between ``fork`` and
``exec`` in a copy of a process that may hold other threads' locks (Python's documentation
warns that it can deadlock); moving the worker itself into the run's cgroup around the
``fork`` would charge the worker's memory and tasks to the run, and a mistake would leave
the worker in a cgroup that ``cgroup.kill`` ends; a shell wrapper would rewrite the
environment (``PWD``, ``SHLVL``, names a shell cannot hold).

So the run's process starts as a tiny **exec wrapper**, :data:`WRAPPER`: the worker's own
interpreter, isolated (``-I -S``: no environment variables, no ``site``, the standard
library only), with an empty environment, the run's working directory, output files and
new session. It blocks reading a pipe. The worker, its parent, moves its pid into the
run's cgroup (``cgroup.procs``), then sends the command and environment down the pipe;
only then does the wrapper ``execve`` the command, as the same process (same pid, same
session), which therefore starts in its cgroup: the only code that ever ran outside it is
the wrapper's. An ``exec`` that fails (command not found, not executable) comes back as its
``errno`` on a second, close-on-exec pipe, as ``subprocess`` reports it, so the worker says
"command not found" exactly as for a plain spawn. EOF on that pipe with nothing said means
the ``exec`` succeeded.

If the move is refused, the run still starts (outside any cgroup: said in its log, its
limits not applied); if the worker gives up half-way (cancelled, a timeout), the wrapper is
killed and reaped, having run nothing.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import trio

WRAPPER: Final = """\
import os, signal, sys
go, err = int(sys.argv[1]), int(sys.argv[2])
chunks = []
while True:
    chunk = os.read(go, 65536)
    if not chunk:
        break
    chunks.append(chunk)
os.close(go)
parts = b"".join(chunks).split(b"\\0")[:-1]
if not parts:
    os._exit(75)
n = int(parts[0])
argv, env = parts[1:1 + n], dict(p.split(b"=", 1) for p in parts[1 + n:])
os.set_inheritable(err, False)
for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):  # ignored by Python at start: as subprocess, not for the run
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
try:
    os.execvpe(argv[0], argv, env)
except OSError as exc:
    os.write(err, str(exc.errno or 0).encode())
os._exit(127)
"""
"""The exec wrapper: reads ``argc\\0arg…\\0NAME=VALUE…\\0`` from fd ``go`` (EOF: given up, exit
75 having run nothing), then ``execvpe``; a failed exec's errno goes to fd ``err``."""
START_TIMEOUT: Final = 60.0
"""From the wrapper's spawn to its exec: an interpreter start (tens of ms; seconds on a
loaded host or under emulation). Past it the wrapper is killed and the start fails."""


def payload(argv: list[str], env: Mapping[str, str]) -> bytes:
    """The command and environment as the wrapper reads them (bytes as ``execve`` takes them)."""
    parts = [str(len(argv)).encode(), *map(os.fsencode, argv)]
    parts += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    return b"\0".join(parts) + b"\0"


async def open_process(
    argv: list[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    stdout: int,
    stderr: int,
    place: Callable[[int], Awaitable[None]],
) -> trio.Process:
    """Start ``argv`` (its own session, stdin ``/dev/null``) through the exec wrapper,
    calling ``place(pid)`` (the move into the run's cgroup) before it may exec. OSError as
    ``subprocess`` raises it if the exec fails (e.g. FileNotFoundError); the wrapper is then
    reaped. ``place`` deals with its own errors (the run then starts where it is)."""
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-I", "-S", "-c", WRAPPER, str(go_r), str(err_w)],
            cwd=cwd,
            env={},
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            pass_fds=(go_r, err_w),
        )
    except BaseException:
        for fd in (go_w, err_r):
            os.close(fd)
        raise
    finally:
        os.close(go_r)
        os.close(err_w)
    go, said = trio.lowlevel.FdStream(go_w), trio.lowlevel.FdStream(err_r)
    done = False
    try:
        with trio.fail_after(START_TIMEOUT):
            await place(proc.pid)
            try:
                await go.send_all(payload(argv, env))
                await go.aclose()
            except trio.BrokenResourceError:  # the wrapper died before reading: its status says why
                await proc.wait()
                raise OSError(
                    errno.ECHILD, f"the exec wrapper exited with status {proc.returncode} before starting it"
                ) from None
            answer = b""
            while chunk := await said.receive_some(64):
                answer += chunk
        if answer:
            await proc.wait()
            code = int(answer) if answer.isdigit() else errno.EIO
            raise OSError(code, os.strerror(code), argv[0])
        done = True
        return proc
    except trio.TooSlowError:
        raise OSError(
            errno.ETIMEDOUT, f"the exec wrapper did not start it within {START_TIMEOUT:g} s"
        ) from None
    finally:
        with trio.CancelScope(shield=True):
            await go.aclose()
            await said.aclose()
            if not done and proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
