"""The leftover sweep stays in the worker's tree (issue 24): real processes, inside and outside."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import wait_for
from worker.process import reaper


def test_descends_follows_parents_and_stops_at_init_or_a_loop() -> None:
    parents = {10: 5, 5: 2, 2: 1, 7: 1, 8: 9, 9: 8}
    assert reaper.descends(10, 2, parents) and reaper.descends(10, 5, parents)
    assert not reaper.descends(7, 2, parents), "a sibling tree"
    assert not reaper.descends(2, 10, parents), "an ancestor is no descendant"
    assert not reaper.descends(8, 2, parents), "a loop (pids read at different times) ends"
    assert not reaper.descends(42, 2, parents), "an unknown process"


PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def alive(pid: int) -> bool:
    facts = reaper.process_facts(pid)
    return facts is not None and facts.state != "Z"


@pytest.fixture
def run_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def outsider(run_id: str) -> Iterator[int]:
    """A process carrying the run's id that is no descendant of this process: its parent
    exits at once and it is re-parented above us (this test process is no subreaper)."""
    env = {**os.environ, "PREFECT__FLOW_RUN_ID": run_id}
    orphaning = ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"]
    # an earlier test of the same pytest process may have made it a subreaper: not while
    # the outsider is orphaned, or it would be re-parented to us
    libc = ctypes.CDLL(None, use_errno=True)
    was = ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was))
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0)
    try:
        shell = subprocess.run(orphaning, env=env, capture_output=True, text=True, check=True)
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, was.value)
    pid = int(shell.stdout)
    facts = wait_for(lambda: reaper.process_facts(pid), 5, 0.01, "the outsider to be there")
    assert not reaper.descends(pid, os.getpid(), {pid: facts.ppid}), "re-parented outside this tree"
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)  # started by this test: ended by its pid


def test_a_process_outside_the_tree_carrying_the_run_id_survives(run_id: str, outsider: int) -> None:
    inside = subprocess.Popen(["sleep", "300"], env={**os.environ, "PREFECT__FLOW_RUN_ID": run_id})
    try:
        assert sorted(reaper.run_processes(run_id, None, anywhere=True)) == sorted([inside.pid, outsider])
        assert reaper.run_processes(run_id, None) == [inside.pid]
        assert reaper.sweep_run(run_id, None) == [inside.pid]
        assert inside.wait(5) == -signal.SIGKILL
        assert alive(outsider), "the process outside the tree is untouched"
    finally:
        inside.kill()
        inside.wait()


def test_a_pid_reused_before_the_signal_is_not_hit() -> None:
    child = subprocess.Popen(["sleep", "300"])
    try:
        facts = reaper.process_facts(child.pid)
        assert facts is not None
        other = reaper.ProcessFacts(facts.pid, facts.state, facts.ppid, facts.pgid, facts.start_time - 1)
        assert not reaper.signal_if_same(other, signal.SIGKILL), "another start time: another process"
        assert alive(child.pid)
        assert reaper.signal_if_same(facts, signal.SIGKILL)
        assert child.wait(5) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
