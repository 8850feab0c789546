"""The README's first command: the demo runs three real flows to COMPLETED, and its console
output is for people: no line wider than 160 characters."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT
from worker.host.logs import CONSOLE_WIDTH, ConsoleLine


def test_demo_completes_with_short_console_lines() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FLOW_WORKER_"))}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("COMPLETED") >= 3
    assert "run.started" in out and "run.finished state=COMPLETED" in out
    widest = max(out.splitlines(), key=len)
    assert len(widest) <= CONSOLE_WIDTH, widest


def test_console_line_shows_the_facts_not_the_ids() -> None:
    render = ConsoleLine()
    line = render(
        None,
        "info",
        {
            "event": "run.exited",
            "level": "info",
            "timestamp": "2026-11-29T21:54:03.123Z",
            "flow_run_id": "2aea8a56-edd5-4c42-a584-000000000000",
            "flow_run_name": "zealous-octopus",
            "pid": 4242,
            "returncode": 1,
            "stderr_tail": "Traceback (most recent call last):\n  ...\nModuleNotFoundError: x",
        },
    )
    assert line.startswith("21:54:03 INFO    zealous-octopus")
    assert "returncode=1" in line and "ModuleNotFoundError" in line and "2aea8a56" not in line
    long = render(None, "info", {"event": "run.output", "line": "x" * 500, "flow_run_name": "r"})
    assert len(long) == CONSOLE_WIDTH and long.endswith("…")
