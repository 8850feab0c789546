"""Files only the worker's user can touch (issue 24): modes whatever the umask, a state
directory someone else could write refused, no symbolic link followed."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.said import Said
from worker import cli
from worker.books.ledger import Entry, Ledger, LedgerError, default_state_dir
from worker.host import private
from worker.process.handle import StartError
from worker.process.spawned import RunHandle
from worker.rules.job import ProcessJobConfiguration

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask_000() -> Iterator[None]:
    before = os.umask(0)
    try:
        yield
    finally:
        os.umask(before)


def entry(run_id: str = "r1") -> Entry:
    return Entry(run_id, "name", "pool", "w", "claimed")


async def test_modes_whatever_the_umask(tmp_path: Path, umask_000: None) -> None:
    ledger = Ledger(tmp_path / "made" / "by" / "worker")
    ledger.open()
    try:
        ledger.write(entry())
        handle = RunHandle(
            "r1",
            Said(),
            config=ProcessJobConfiguration(command="sh -c 'echo out; echo err >&2'", env=dict(os.environ)),
            output_dir=ledger.output_dir,
        )
        await handle.start()
        files = [path for path, _ in handle.output_paths()]
        assert {path: mode(path) for path in files} == {path: 0o600 for path in files}
        await handle.wait()
    finally:
        ledger.close()
    for made in (tmp_path / "made", tmp_path / "made" / "by", ledger.directory):
        assert mode(made) == 0o700, made
    assert mode(ledger.runs_dir) == 0o700 and mode(ledger.output_dir) == 0o700
    assert mode(ledger.directory / "ledger.lock") == 0o600
    assert mode(ledger.runs_dir / "r1.json") == 0o600


def test_what_an_older_worker_left_is_made_private(tmp_path: Path, umask_000: None) -> None:
    state = tmp_path / "state"
    (state / "output").mkdir(parents=True, mode=0o755)  # flow-worker before issue 24: output/ 0755
    state.chmod(0o755)
    (state / "ledger.lock").touch(mode=0o644)
    ledger = Ledger(state)
    ledger.open()
    ledger.close()
    assert mode(state / "output") == 0o700 and mode(state / "ledger.lock") == 0o600
    assert mode(state) == 0o755, "one the worker did not create keeps its mode (nobody else writes it)"


def refusal(path: Path) -> str:
    with pytest.raises(LedgerError) as refused:
        Ledger(path).open()
    return str(refused.value)


def test_a_state_directory_another_user_owns_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    said = refusal(state)
    assert said.startswith(f"state directory {state} is owned by uid {NOBODY} (")
    assert f"not by uid {os.geteuid()} (" in said and "set state_dir" in said
    assert not (state / "runs").exists(), "nothing is written there"


@pytest.mark.parametrize(
    ("bits", "who"), [(0o777, "its group and others"), (0o707, "others"), (0o770, "its group")]
)
def test_a_state_directory_others_can_write_is_refused(tmp_path: Path, bits: int, who: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(bits)
    said = refusal(state)
    assert said.startswith(f"state directory {state} is writable by {who} (mode {bits:04o}): refused")
    assert said.endswith(f"chmod 700 {state}")


def test_a_directory_above_that_others_could_replace_it_in_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    said = refusal(shared / "state")
    assert said.startswith(f"state directory {shared / 'state'}: {shared} above it is writable by its group")
    assert "without the sticky bit" in said and not (shared / "state").exists()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    assert f"{theirs} above it is owned by uid {NOBODY}" in refusal(theirs / "state")


def test_a_sticky_directory_above_is_fine(tmp_path: Path) -> None:
    tmp_like = tmp_path / "tmp"
    tmp_like.mkdir()
    tmp_like.chmod(0o1777)
    ledger = Ledger(tmp_like / "mine")
    ledger.open()
    ledger.close()
    assert mode(tmp_like / "mine") == 0o700


def test_the_cli_says_it_in_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    for name in [*os.environ]:  # only what this test sets counts
        if name.startswith(("PREFECT_", "FLOW_WORKER_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("FLOW_WORKER_STATE_DIR", str(state))
    assert cli.main(["--pool", "p"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"flow-worker: state directory {state} is writable by")


def test_without_home_there_is_no_guessed_state_directory() -> None:
    with pytest.raises(LedgerError, match=r"HOME is not set.*set state_dir \(--state-dir, FLOW_WORKER_STATE"):
        default_state_dir({"PATH": "/usr/bin"}, "p")
    assert default_state_dir({"XDG_STATE_HOME": "/x"}, "p") == Path("/x/flow-worker/p")


async def test_a_symlink_planted_at_an_output_path_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    target.chmod(0o644)
    output = tmp_path / "output"
    output.mkdir(mode=0o700)
    (output / "r1.out").symlink_to(target)
    ran = tmp_path / "ran"
    handle = RunHandle(
        "r1",
        Said(),
        config=ProcessJobConfiguration(command=f"touch {ran}", env=dict(os.environ)),
        output_dir=output,
    )
    with pytest.raises(StartError, match=r"output files: .*a symbolic link, not followed: .*r1\.out"):
        await handle.start()
    assert handle.process is None and not ran.exists(), "nothing started"
    assert target.read_text() == "keep me\n" and mode(target) == 0o644, "the target is untouched"


def test_ledger_files_are_not_opened_through_a_symlink(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "state")
    ledger.open()
    target = tmp_path / "precious"
    target.write_text("{}")
    (ledger.runs_dir / "r1.tmp").symlink_to(target)
    with pytest.raises(OSError, match="a symbolic link, not followed"):
        ledger.write(entry("r1"))
    assert target.read_text() == "{}"
    (ledger.runs_dir / "r2.json").symlink_to(target)
    good, bad = ledger.entries()
    assert good == [] and len(bad) == 1 and bad[0].startswith("r2.json: ")
    assert target.read_text() == "{}"
    ledger.close()
    lock = tmp_path / "other" / "ledger.lock"
    lock.parent.mkdir(mode=0o700)
    lock.symlink_to(target)
    with pytest.raises(LedgerError, match=r"a symbolic link, not followed \(.*ledger\.lock\)"):
        Ledger(lock.parent).open()


def test_private_dir_refuses_a_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (tmp_path / "output").symlink_to(elsewhere)
    with pytest.raises(OSError, match="a symbolic link, not followed"):
        private.private_dir(tmp_path / "output")
    assert mode(elsewhere) == 0o755
