"""py-spy's collapsed stacks summed up: where a worker's CPU went during a bench scenario.

``bench/compare --profile`` samples the worker with a static ``py-spy`` binary (``pip download
py-spy``: the wheel's ``py-spy`` is static): ``--nonblocking``, so the worker is never
stopped, and py-spy's own CPU is its own, not the worker's. :func:`top` turns the raw
output (one ``frame;frame;… count`` line per distinct stack) into the frames most often
on the stack (inclusive) and on its top (self), as shares of the samples.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def top(collapsed: str, n: int = 25) -> str:
    inclusive: dict[str, int] = {}
    leaf: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + int(count)
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + int(count)
    out = [f"{total} samples"]
    for name, table in (("inclusive", inclusive), ("self", leaf)):
        out.append(f"-- {name}")
        for frame, samples in sorted(table.items(), key=lambda kv: -kv[1])[:n]:
            out.append(f"{100 * samples / max(total, 1):5.1f}%  {frame}")
    return "\n".join(out)


def command(py_spy: Path | str, pid: int | str, output: str, rate: int = 50) -> list[str]:
    """The ``py-spy record`` command that samples ``pid`` until interrupted (SIGINT)."""
    return [
        str(py_spy), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
        "--nonblocking", "--output", output, "--duration", "3600",
    ]  # fmt: skip


class Recording:
    """py-spy sampling a local process until :meth:`stop`, which returns :func:`top`'s summary."""

    def __init__(self, py_spy: Path, pid: int, output: Path) -> None:
        self.output = output
        self.proc = subprocess.Popen(
            command(py_spy, pid, str(output)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
        _, err = self.proc.communicate(timeout=120)
        try:
            return top(self.output.read_text())
        except OSError:
            return f"py-spy wrote nothing: {err.decode(errors='replace')[-2000:]}"
