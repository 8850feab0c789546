"""How a run of the default engine command starts, as Prefect 3.9.1's process worker starts
it: ``PYTHONPATH`` with the flow's working directory first, and ``uv run --no-default-groups
--project ROOT …`` when ``PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES`` is true in the run's
environment, the project's ``pyproject.toml`` declares ``prefect`` and ``uv`` is on the
run's ``PATH``. ``rules/workspace.py`` decides; this module looks at the file system
(resolved paths, the project's ``pyproject.toml``, ``uv`` on the run's ``PATH``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from worker.rules import workspace
from worker.rules.workspace import InterpreterDirs

UNFOLLOWED = (
    "PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES is set, but the deployment's pull steps decide "
    "where the project is when they run, and flow-worker's engine runs them after the start"
)


NO_UV = (
    "PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES is set and {} declares prefect, but uv is not on the "
    "run's PATH: started with the worker's interpreter"
)


@attrs.frozen
class Launch:
    """What to start: the command and environment; ``note``: why ``uv run`` was asked for
    and not used (for the run's log)."""

    argv: list[str]
    env: dict[str, str]
    note: str | None = None


def project_root(working_dir: Path, workspace_root: Path) -> Path | None:
    """The nearest directory with a ``pyproject.toml``, from ``working_dir`` up to the
    workspace root (up to ``/`` when the working directory is outside it), as Prefect finds it."""
    bound = workspace_root if working_dir.is_relative_to(workspace_root) else Path(working_dir.anchor)
    here = working_dir
    while True:
        if (here / "pyproject.toml").is_file():
            return here
        if here == bound or here.parent == here:
            return None
        here = here.parent


def _declares_prefect(root: Path) -> bool:
    try:
        return workspace.declares_prefect((root / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return False


def prepare(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    pull_steps: Any,
    interpreter: InterpreterDirs | None,
) -> Launch:
    """The launch of a default-command run that starts in ``cwd`` (the workspace root)."""
    start = os.path.realpath(cwd)
    after_pull = workspace.working_directory(pull_steps, start)
    working_dir = os.path.realpath(after_pull) if after_pull is not None else start

    def owned(entry: str) -> bool:
        return interpreter is not None and interpreter.owns(
            os.path.realpath(os.path.join(working_dir, entry))
        )

    env = {**env, "PYTHONPATH": workspace.pythonpath(working_dir, env.get("PYTHONPATH"), owned)}
    if not workspace.auto_install(env.get(workspace.AUTO_INSTALL)):
        return Launch(list(argv), env)
    if after_pull is None:
        return Launch(list(argv), env, UNFOLLOWED)
    root = project_root(Path(working_dir), Path(start))
    if root is None or not _declares_prefect(root):
        return Launch(list(argv), env)
    uv = shutil.which("uv", path=env.get("PATH", os.defpath))
    if uv is None:
        return Launch(list(argv), env, NO_UV.format(root / "pyproject.toml"))
    return Launch(workspace.uv_run(uv, str(root)), env)
