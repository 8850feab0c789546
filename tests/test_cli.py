"""The command line: every flag of `prefect worker start` accepted with Prefect's meaning, and
`--run-once` exiting as Prefect's worker exits."""

from __future__ import annotations

import gc
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN
from worker import cli
from worker.host.settings import load

VALUES = {"STR": "x", "STR...": "x", "INT": "3", "CHOICE": "never", "PATH": "/dev/null"}


def prefects_flags(tmp_path: Path) -> list[list[str]]:
    """``prefect worker start --help``'s flags, each as argv (with a value where one is taken)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), COLUMNS="250")
    argv = [str(BIN / "prefect"), "worker", "start", "--help"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = []
    for line in done.stdout.splitlines():
        row = re.match(r"│ (-.*?)(?:\s{2,}|│)", line)
        if row is None:
            continue
        tokens = row[1].split()
        kind = next((t for t in tokens if not t.startswith("-")), None)
        for flag in (t for t in tokens if t.startswith("-") and t not in ("-h", "--help")):
            takes = kind is not None and not flag.startswith(("--no-", "--empty-"))
            out.append([flag, VALUES[kind]] if takes and kind else [flag])
    return out


def test_every_flag_of_prefects_worker_start_is_accepted(tmp_path: Path) -> None:
    flags = prefects_flags(tmp_path)
    names = {argv[0] for argv in flags}
    assert {"--pool", "-q", "--empty-work-queue", "--no-run-once", "--create-pool-if-not-found"} <= names
    assert {"--no-create-pool-if-not-found", "--profile", "--no-prompt", "--with-healthcheck"} <= names
    parser = cli.build_parser()
    for argv in flags:
        parser.parse_args(argv)  # an unknown flag or a refused value exits 2


def parsed(*argv: str) -> dict[str, Any]:
    return vars(cli.build_parser().parse_args(list(argv)))


def test_prefects_meaning() -> None:
    assert parsed("--no-create-pool-if-not-found") == {"create_pool_if_not_found": False}
    assert parsed("--create-pool-if-not-found") == {"create_pool_if_not_found": True}
    assert parsed("-q", "a", "-q", "b") == {"work_queues": ["a", "b"]}
    assert parsed("-q", "a", "--empty-work-queue") == {"work_queues": []}  # every queue
    assert parsed("--no-with-healthcheck") == {"with_healthcheck": False}
    assert parsed("--run-once") == {"run_once": True} and parsed("--no-run-once") == {"run_once": False}
    assert parsed("--profile", "prod", "--no-prompt") == {"profile": "prod", "prompt": False}
    assert parsed("-t", "process", "--install-policy", "always") == {
        "worker_type": "process",
        "install_policy": "always",
    }
    s = load({"create_pool_if_not_found": False, "work_queues": [], "with_healthcheck": False}, {})
    assert (s.create_pool_if_not_found, s.work_queues, s.with_healthcheck) == (False, (), False)


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--once"], 1),  # flow-worker's own flag: a crashed run makes the exit status 1
        (["--run-once"], 0),  # Prefect's flag: Prefect's worker exits 0 after a crashed run
        (["--run-once", "--once"], 0),
        (["--no-run-once"], 1),  # serving: the status is the supervisor's
    ],
)
def test_run_once_exits_as_prefects_worker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str], code: int
) -> None:
    seen: dict[str, Any] = {}

    async def supervised(settings: Any, ledger: Any) -> int:
        seen["once"] = settings.once
        ledger.close()
        return cli.EXIT_RUN_FAILED  # a run crashed

    monkeypatch.setattr(cli, "_amain", supervised)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("FLOW_WORKER_LOG_FORMAT", "json")
    assert cli.main(["--pool", "p", "--state-dir", str(tmp_path / "s"), *argv]) == code
    assert seen["once"] is ("--no-run-once" not in argv)


def test_another_type_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--pool", "p", "--type", "kubernetes"]) == cli.EXIT_USAGE
    assert gc.isenabled(), "the collector, off while the worker starts, is on again whatever main returns"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--type 'kubernetes' is not supported" in err
