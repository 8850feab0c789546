"""RunHandle with real child processes: exit codes, output, the kill policy, reaping."""

from __future__ import annotations

import errno
import os
import re
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.said import Said
from worker.process.handle import StartDeferred, StartError
from worker.process.spawned import RunHandle
from worker.rules.budget import LINE_BURST, LINES_PER_SECOND
from worker.rules.job import ProcessJobConfiguration


def handle(command: str, grace: float = 5.0, **cfg: Any) -> tuple[RunHandle, Said]:
    config = ProcessJobConfiguration(command=command, env=dict(os.environ), **cfg)
    log = Said()
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


# ---------------------------------------------------------------- start errors (issue 19)


class Spawned:
    """What a failed start may leave behind: its temporary directory, its descriptors."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmpdirs: list[str] = []
        real = tempfile.mkdtemp

        def mkdtemp(*args: Any, **kw: Any) -> str:
            path = str(real(*args, **kw))
            self.tmpdirs.append(path)
            return path

        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
        self.fds = set(os.listdir("/proc/self/fd"))

    def assert_nothing_left(self, h: RunHandle) -> None:
        assert self.tmpdirs and not any(Path(p).exists() for p in self.tmpdirs), "tmpdir removed"
        assert h.output_dir is None or not list(h.output_dir.iterdir()), "output files removed"
        assert set(os.listdir("/proc/self/fd")) == self.fds, "no descriptor leaked"
        assert h.process is None


@pytest.mark.parametrize(
    ("command", "env", "said"),
    [
        ("true", {"A=B": "1"}, "'env.A=B': a variable name cannot contain '='"),
        ("true", {"": "1"}, "has an empty variable name"),
        ("true", {"X": "a\0b"}, "'env.X': the value contains a NUL character"),
        ("true", {"X": ["a", "b"]}, "environment variable 'X' must be a string, not list"),
        ("true\0", {}, "'command' contains a NUL character"),
    ],
)
async def test_what_no_process_can_start_with_is_named(
    command: str, env: dict[str, Any], said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, _ = handle(command)
    h.config.env = {**h.config.env, **env}
    left = Spawned(monkeypatch)
    with pytest.raises(StartError, match=re.escape(said)) as raised:
        await h.start()
    assert not isinstance(raised.value, StartDeferred)
    assert h.process is None and set(os.listdir("/proc/self/fd")) == left.fds


async def test_a_nul_in_the_working_directory_is_named(tmp_path: Path) -> None:
    h, _ = handle("true", working_dir=Path(f"{tmp_path}/a\0b"))
    with pytest.raises(StartError, match="job variable 'working_dir' contains a NUL character"):
        await h.start()


@pytest.mark.parametrize("error", [ValueError("embedded null byte"), TypeError("expected str, not int")])
async def test_a_spawn_error_not_foreseen_is_still_a_start_error(
    error: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: Any, **kw: Any) -> Any:
        raise error

    monkeypatch.setattr(trio.lowlevel, "open_process", refuse)
    h, _ = handle("true")
    left = Spawned(monkeypatch)
    with pytest.raises(StartError, match=f"cannot start the process: {type(error).__name__}: {error}"):
        await h.start()
    left.assert_nothing_left(h)


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (errno.EAGAIN, "no process can be created now"),
        (errno.ENOMEM, "not enough memory"),
        (errno.EMFILE, "too many open files"),
    ],
)
async def test_a_spawn_out_of_resources_is_deferred(
    code: int, said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: Any, **kw: Any) -> Any:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(trio.lowlevel, "open_process", refuse)
    h, _ = handle("true")
    left = Spawned(monkeypatch)
    with pytest.raises(StartDeferred, match=f"^{said}.* \\(starting the process\\): "):
        await h.start()
    left.assert_nothing_left(h)


async def test_no_space_for_the_output_files_is_deferred(monkeypatch: pytest.MonkeyPatch) -> None:
    h, _ = handle("true")
    real_open = os.open
    opened: list[int] = []

    def open_output(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if str(path).endswith(".err"):  # the second file: the first must be closed again
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        fd = real_open(path, flags, mode, **kw)
        opened.append(fd)
        return fd

    left = Spawned(monkeypatch)
    monkeypatch.setattr(os, "open", open_output)
    with pytest.raises(StartDeferred, match=r"^no space left on device \(opening the output files\): "):
        await h.start()
    monkeypatch.undo()
    assert opened
    left.assert_nothing_left(h)


async def test_too_many_open_files_for_the_output_files_is_deferred(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real EMFILE: the soft descriptor limit lowered to the lowest free descriptor."""
    h, _ = handle("true")
    left = Spawned(monkeypatch)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        with pytest.raises(StartDeferred, match=r"^too many open files \(opening the output files\): "):
            await h.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    left.assert_nothing_left(h)


async def test_a_flood_beside_a_run_is_bounded_and_the_tail_kept(tmp_path: Path) -> None:
    """Through RunHandle: a 2 s flood on stdout and stderr, then a traceback on stderr and
    exit 1. The log gets the budget's worth, the drop is said, the crash message's tail
    is the traceback, and the output files are gone."""
    script = tmp_path / "flood.py"
    script.write_text(
        "import os, sys, time\n"
        "end = time.monotonic() + 2\n"
        "while time.monotonic() < end:\n"
        "    os.write(1, b'y\\n' * 4096); os.write(2, b'noise\\n' * 512)\n"
        "sys.exit('Traceback (most recent call last):\\nRuntimeError: the real error')\n"
    )
    h, log = handle(f"{sys.executable} {script}")
    await h.start()
    assert await h.wait() == 1
    assert LINE_BURST <= len(log.lines()) <= LINE_BURST + 3 * LINES_PER_SECOND
    dropped = [kw for e, kw in log.events if e == "run.output_dropped"]
    assert len(dropped) == 1 and dropped[0]["lines"] > 100_000
    assert h.stderr_tail().endswith("noise\nTraceback (most recent call last):\nRuntimeError: the real error")
    assert h.output_dir is not None and not list(h.output_dir.iterdir())
