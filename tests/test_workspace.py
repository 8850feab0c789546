"""A default-command run's workspace (``rules/workspace.py``, ``process/launch.py``): its
PYTHONPATH and its `uv run` launch, as Prefect 3.9.1's process worker prepares them; checked
against Prefect's own functions, pydantic and packaging."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from pydantic import TypeAdapter, ValidationError

from worker.process import launch, startkey
from worker.rules import workspace
from worker.rules.workspace import InterpreterDirs
from worker.runs import interpreter

SET_WD = "prefect.deployments.steps.set_working_directory"


def test_where_the_pull_steps_leave_the_flow() -> None:
    assert workspace.working_directory(None, "/w") == "/w"
    assert workspace.working_directory([], "/w") == "/w"
    steps = [{SET_WD: {"directory": "/srv/project"}}, {SET_WD: {"directory": "flows", "id": "x"}}]
    assert workspace.working_directory(steps, "/w") == "/srv/project/flows"
    assert workspace.working_directory([{SET_WD: {"directory": "sub"}}], "/w") == "/w/sub"
    pull = "prefect.deployments.steps.pull.set_working_directory"
    assert workspace.working_directory([{pull: {"directory": "/p"}}], "/w") == "/p"
    for unknown in (
        [{"prefect.deployments.steps.git_clone": {"repository": "https://x/r.git"}}],
        [{SET_WD: {"directory": "{{ clone.directory }}"}}],
        [{SET_WD: {"directory": "/p"}}, {"prefect.deployments.steps.run_shell_script": {"script": "cd x"}}],
        [{SET_WD: {}}],
        "not a list",
    ):
        assert workspace.working_directory(unknown, "/w") is None


DIRS = InterpreterDirs(("/usr/lib/python3.11",), ("/venv/lib/python3.11/site-packages",), "python311.zip")


def test_the_interpreters_own_directories() -> None:
    assert DIRS.owns("/venv/lib/python3.11/site-packages")
    assert not DIRS.owns("/venv/lib/python3.11/site-packages/mine")  # a directory inside: the user's
    assert DIRS.owns("/usr/lib/python3.11") and DIRS.owns("/usr/lib/python3.11/json")
    assert DIRS.owns("/usr/lib/python311.zip") and not DIRS.owns("/srv/python311.zip")
    assert not DIRS.owns("/srv/project")
    assert workspace.pythonpath(
        "/w", "/extra::/w:/usr/lib/python3.11/json:/venv/lib/python3.11/site-packages:/extra:rel", DIRS.owns
    ) == os.pathsep.join(["/w", "/extra", "rel"])
    assert workspace.pythonpath("/w", None, DIRS.owns) == "/w"


ENTRIES = st.sampled_from(["", "/w", "/a", "rel", "/usr/lib/python3.11", "/usr/lib/python3.11/x", "/a"])


@given(st.sampled_from(["/w", "/a"]), st.none() | st.lists(ENTRIES, max_size=6).map(os.pathsep.join))
def test_pythonpath_keeps_order_once_without_empties(working_dir: str, existing: str | None) -> None:
    entries = workspace.pythonpath(working_dir, existing, DIRS.owns).split(os.pathsep)
    assert entries[0] == working_dir and len(entries) == len(set(entries)) and "" not in entries
    given_ = [working_dir, *(existing.split(os.pathsep) if existing else [])]
    assert entries == [e for i, e in enumerate(given_) if e and e not in given_[:i] and not DIRS.owns(e)]


@given(st.text(max_size=8) | st.sampled_from(["true", "True", "YES", "on", "1", "t", "y", " true", "2"]))
def test_auto_install_is_read_as_pydantic_reads_a_bool(value: str) -> None:
    try:
        expected = TypeAdapter(bool).validate_python(value)
    except ValidationError:
        expected = False
    assert workspace.auto_install(value) is expected
    assert workspace.auto_install(None) is False


NEAR_PREFECT = st.tuples(
    st.sampled_from(["", " ", "x", "my-"]),
    st.sampled_from(["prefect", "Prefect", "PREFECT", "pre-fect", "prefect_", "prefect.", "prefects"]),
    st.sampled_from(
        ["", " ", "[aws]", ">=3", " @ file:///x", ";python_version>'3'", "==", "(>=3)", "-aws", "@"]
    ),
    st.text(max_size=6),
).map("".join)


@given(st.text(max_size=30) | NEAR_PREFECT)
@settings(max_examples=500)
def test_a_requirement_names_prefect_as_packaging_reads_it(requirement: str) -> None:
    """Prefect's condition for `uv run`: a dependency that packaging reads as ``prefect``."""
    try:
        name = canonicalize_name(Requirement(requirement).name)
    except InvalidRequirement:
        return  # Prefect skips it; flow-worker reads the name anyway (a looser reading)
    assert (workspace.requirement_name(requirement) == "prefect") == (name == "prefect")


def test_declares_prefect() -> None:
    assert workspace.declares_prefect('[project]\ndependencies = ["numpy", "Prefect>=3"]\n')
    assert not workspace.declares_prefect('[project]\ndependencies = ["prefect-aws"]\n')
    assert not workspace.declares_prefect('[tool.uv]\ndev-dependencies = ["prefect"]\n')
    assert not workspace.declares_prefect("not toml [")
    assert not workspace.declares_prefect('[project]\ndependencies = "prefect"\n')


def fake_uv(directory: Path) -> Path:
    uv = directory / "uv"
    directory.mkdir(parents=True, exist_ok=True)
    uv.write_text("#!/bin/sh\n")
    uv.chmod(uv.stat().st_mode | stat.S_IEXEC)
    return uv


ENGINE = ["/venv/bin/python", "-m", "prefect.engine"]


def test_the_uv_launch_and_its_conditions(tmp_path: Path) -> None:
    root = tmp_path / "work"
    (root / "flows").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "p"\ndependencies = ["prefect>=3", "mylib"]\n')
    uv = fake_uv(tmp_path / "bin")
    env = {"PATH": f"/nonexistent:{uv.parent}", "PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES": "true"}
    steps = [{SET_WD: {"directory": str(root / "flows")}}]
    got = launch.prepare(ENGINE, env, str(root), steps, None)
    assert got.argv == [
        str(uv),
        "run",
        "--no-default-groups",
        "--project",
        str(root),
        "python",
        "-m",
        "prefect.engine",
    ]
    assert got.env["PYTHONPATH"] == str(root / "flows") and got.note is None
    assert startkey.start_key(got.argv, got.env, str(root)) == (
        "the run starts through `uv run` in its project's environment (auto-install dependencies)"
    )
    off = {**env, "PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES": "false"}
    assert launch.prepare(ENGINE, off, str(root), steps, None).argv == ENGINE
    no_uv = launch.prepare(ENGINE, {**env, "PATH": "/nonexistent"}, str(root), steps, None)
    assert no_uv.argv == ENGINE and no_uv.note == launch.NO_UV.format(root / "pyproject.toml")
    unfollowed = launch.prepare(ENGINE, env, str(root), [{"prefect.deployments.steps.git_clone": {}}], None)
    assert unfollowed.argv == ENGINE and unfollowed.note == launch.UNFOLLOWED
    (root / "pyproject.toml").write_text('[project]\nname = "p"\ndependencies = ["mylib"]\n')
    assert launch.prepare(ENGINE, env, str(root), steps, None).argv == ENGINE


PREFECTS_VIEW = """
import json, sys
from pathlib import Path
from prefect.runner._workspace_resolver import PreparedWorkspace, _find_project_root
from prefect.runner._workspace_starter import _uv_run_command, workspace_environment
from prefect.utilities.processutils import command_from_string
out = []
for case in json.loads(sys.argv[1]):
    root, wd = Path(case["root"]), Path(case["wd"])
    ws = PreparedWorkspace(workspace_root=root, working_directory=wd, runtime_entrypoint="flows/x.py:f",
        project_root=_find_project_root(wd, root), environment=case["env"], sys_path=[])
    env = workspace_environment(ws)
    command = _uv_run_command(ws, case["env"])
    out.append({"PYTHONPATH": env["PYTHONPATH"], "uv": command_from_string(command)[:5] if command else None})
print(json.dumps(out))
"""


def test_as_prefects_own_functions_decide(tmp_path: Path) -> None:
    dirs = interpreter._dirs(
        subprocess.run(
            [sys.executable, "-c", interpreter.FIND_PREFECT], capture_output=True, check=True
        ).stdout
    )
    assert dirs is not None and dirs.site and dirs.stdlib
    site, stdlib = dirs.site[0], dirs.stdlib[0]
    root = (tmp_path / "ws").resolve()
    inside, outside = root / "repo" / "flows", (tmp_path / "elsewhere" / "project" / "src").resolve()
    for directory in (inside, outside):
        directory.mkdir(parents=True)
    (root / "repo" / "pyproject.toml").write_text('[project]\nname = "p"\ndependencies = ["prefect"]\n')
    (outside.parent / "pyproject.toml").write_text('[project]\nname = "q"\ndependencies = ["prefect>=3"]\n')
    uv = fake_uv(tmp_path / "bin")
    on = {"PATH": str(uv.parent), "PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES": "yes"}
    cases = [
        {
            "root": str(root),
            "wd": str(inside),
            "env": {**on, "PYTHONPATH": f"/opt/x:{site}::{stdlib}/json:rel"},
        },
        {"root": str(root), "wd": str(outside), "env": on},
        {"root": str(root), "wd": str(root), "env": on},
        {"root": str(root), "wd": str(inside), "env": {"PATH": str(uv.parent)}},
    ]
    done = subprocess.run(
        [sys.executable, "-c", PREFECTS_VIEW, json.dumps(cases)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for case, prefects in zip(cases, json.loads(done.stdout.splitlines()[-1]), strict=True):
        steps = [{SET_WD: {"directory": case["wd"]}}]
        ours = launch.prepare(ENGINE, case["env"], case["root"], steps, dirs)
        assert ours.env["PYTHONPATH"] == prefects["PYTHONPATH"]
        assert (ours.argv[:5] if ours.argv != ENGINE else None) == prefects["uv"]


def test_the_interpreter_check_says_where_its_directories_are() -> None:
    assert interpreter._dirs(b'[["/usr/lib/python3.11"], ["/v/site-packages"], "python311.zip"]\n') == (
        InterpreterDirs(("/usr/lib/python3.11",), ("/v/site-packages",), "python311.zip")
    )
    assert interpreter._dirs(b"") is None and interpreter._dirs(b"[1]") is None


@pytest.mark.parametrize("argv", [["uv", "run"], ["/x/uv", "run", "--project", "p", "python"], ENGINE])
def test_only_the_uv_launch_is_one(argv: list[str]) -> None:
    assert not workspace.is_uv_run(argv)
