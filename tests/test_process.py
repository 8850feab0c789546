"""RunHandle with real child processes: exit codes, output, the kill policy, reaping."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio

from worker.job import ProcessJobConfiguration
from worker.process import RunHandle, StartError


class ListLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _add(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    info = warning = error = debug = _add

    def lines(self) -> list[str]:
        return [kw["line"] for e, kw in self.events if e == "run.output"]


def handle(command: str, grace: float = 5.0, **cfg: Any) -> tuple[RunHandle, ListLog]:
    config = ProcessJobConfiguration(command=command, env=dict(os.environ), **cfg)
    log = ListLog()
    return RunHandle("run-1", log, grace=grace, config=config, output_dir=Path(tempfile.mkdtemp())), log


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_exit_code_and_output_lines() -> None:
    h, log = handle("sh -c 'echo one; echo two >&2; printf partial; exit 3'")
    await h.start()
    assert await h.wait() == 3
    assert sorted(log.lines()) == ["one", "partial", "two"]
    assert h.output_dir is not None and not list(h.output_dir.iterdir()), "output files removed"


async def test_temp_dir_is_used_and_removed() -> None:
    h, log = handle("pwd")
    await h.start()
    tmp = h.tmpdir
    assert tmp is not None and tmp.is_dir()
    assert await h.wait() == 0
    assert log.lines() == [str(tmp)]
    assert not tmp.exists()


async def test_start_errors_say_what_is_wrong(tmp_path: Path) -> None:
    h, _ = handle("no-such-binary-xyz arg")
    with pytest.raises(StartError, match="command not found: 'no-such-binary-xyz'"):
        await h.start()
    h, _ = handle("true", working_dir=tmp_path / "missing")
    with pytest.raises(StartError, match="does not exist"):
        await h.start()


async def test_cancel_terminates_the_group_including_grandchildren(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    h, _ = handle(f"sh -c 'sleep 300 & echo $! > {pidfile}; wait'")
    pid = await h.start()
    async with trio.open_nursery() as nursery:
        result: list[int] = []

        async def waiter() -> None:
            result.append(await h.wait())

        nursery.start_soon(waiter)
        with trio.fail_after(10):
            while not pidfile.exists() or not pidfile.read_text().strip():
                await trio.sleep(0.05)
        grandchild = int(pidfile.read_text())
        h.cancel("test")
    assert result and result[0] != 0
    assert not alive(pid)
    with trio.fail_after(5):
        while alive(grandchild):
            await trio.sleep(0.05)


async def test_kill_policy_escalates_to_sigkill() -> None:
    h, log = handle("sh -c 'trap \"\" TERM; echo ready; sleep 300 & wait; sleep 300'", grace=0.5)
    await h.start()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.wait)
        with trio.fail_after(10):
            while "ready" not in log.lines():
                await trio.sleep(0.05)
        h.cancel("test")
    assert h.process is not None and h.process.returncode == -9
    assert any(e == "run.killing" for e, _ in log.events)


async def test_cancelled_waiter_still_reaps_the_child() -> None:
    h, _ = handle("sleep 300", grace=2.0)
    pid = await h.start()
    with trio.move_on_after(0.3):
        await h.wait()
    assert h.process is not None and h.process.returncode is not None
    assert not alive(pid)
