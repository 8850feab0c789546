"""The ledger on disk, and the reconcile table (pure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.books.ledger import Entry, Ledger, LedgerError, Report, default_state_dir
from worker.rules import decisions
from worker.rules.decisions import Action
from worker.rules.models import StateType


def entry(phase: str = "started", **kw: object) -> Entry:
    return Entry("run-1", "name", "pool", "w", phase, **kw)  # type: ignore[arg-type]


def test_write_read_update_remove(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.open()
    e = entry(pid=12, start_time=99, boot_id="b")
    ledger.write(e)
    e2 = ledger.update(e, phase="finished", report=Report("crash", "msg", "tid"))
    assert ledger.entries() == ([e2], [])
    assert not list(ledger.runs_dir.glob("*.tmp"))
    ledger.remove("run-1")
    assert ledger.entries() == ([], [])
    ledger.close()


def test_second_worker_is_refused(tmp_path: Path) -> None:
    first = Ledger(tmp_path)
    first.open()
    with pytest.raises(LedgerError, match="in use by another flow-worker"):
        Ledger(tmp_path).open()
    first.close()
    second = Ledger(tmp_path)
    second.open()  # free again once the first let go
    second.close()


def test_unreadable_entry_is_set_aside(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.open()
    (ledger.runs_dir / "junk.json").write_text("{not json")
    (ledger.runs_dir / "half.json").write_text(json.dumps({"flow_run_id": "x"}))
    good, bad = ledger.entries()
    assert good == [] and len(bad) == 2
    assert not list(ledger.runs_dir.glob("*.json"))


def test_default_state_dir() -> None:
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/flow-worker/p:/other"}, "p") == Path(
        "/var/lib/flow-worker/p"
    )
    assert default_state_dir({"HOME": "/home/u"}, "p") == Path("/home/u/.local/state/flow-worker/p")
    assert default_state_dir({"XDG_STATE_HOME": "/x"}, "p") == Path("/x/flow-worker/p")


@pytest.mark.parametrize(
    ("phase", "report", "alive", "state", "run_tid", "expected"),
    [
        ("finished", True, False, StateType.RUNNING, None, Action.DELIVER),
        ("started", False, True, StateType.RUNNING, None, Action.ADOPT),
        ("started", False, False, StateType.RUNNING, None, Action.CRASH),
        ("started", False, False, StateType.COMPLETED, None, Action.FORGET),
        ("started", False, False, None, None, Action.FORGET),
        ("claimed", False, False, StateType.PENDING, "mine", Action.RESCHEDULE),
        # a peer returned it to the queue and another worker claimed it: not ours to touch
        ("claimed", False, False, StateType.PENDING, "someone-else", Action.FORGET),
        ("claimed", False, False, StateType.CANCELLED, None, Action.FORGET),
        ("claiming", False, False, StateType.PENDING, "mine", Action.RESCHEDULE),
        ("claiming", False, False, StateType.PENDING, "someone-else", Action.FORGET),
        ("claiming", False, False, StateType.SCHEDULED, None, Action.FORGET),
    ],
)
def test_reconcile_table(
    phase: str, report: bool, alive: bool, state: StateType | None, run_tid: str | None, expected: Action
) -> None:
    assert decisions.reconcile(phase, report, alive, state, run_tid, "mine", 42).action is expected


def test_lost_process_message_names_the_pid() -> None:
    d = decisions.reconcile("started", False, False, StateType.RUNNING, None, "t", 4242)
    assert "(pid 4242)" in d.message
