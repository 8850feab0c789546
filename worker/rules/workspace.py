"""A run's workspace as Prefect 3.9.1's process worker prepares it (``runner/_workspace_*.py``,
``runner/_uv_command.py``), for runs of the default engine command: the directory the pull
steps leave the flow in, the ``PYTHONPATH`` the run gets, and when it starts through
``uv run``. Pure: the file system is read by ``process/launch.py``.

Prefect 3.9.1 runs the pull steps in a process of their own before the engine, and then
knows where they left the flow. flow-worker's engine runs them itself (as Prefect's did
before 3.8), so the worker decides beforehand, from what it can know then: the directory
the run starts in, and the ``set_working_directory`` steps with a literal directory (what
``prefect deploy`` writes for local code). A step that fetches or computes the directory
(``git_clone``, remote storage, a template) is not followed: ``PYTHONPATH`` then has the
start directory, and ``uv run`` is not used (said in the run's log).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs

SET_WORKING_DIRECTORY: Final = frozenset(
    {
        "prefect.deployments.steps.set_working_directory",
        "prefect.deployments.steps.pull.set_working_directory",
    }
)
AUTO_INSTALL: Final = "PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES"
_TRUE: Final = frozenset({"1", "on", "t", "true", "y", "yes"})
"""What pydantic takes for true (Prefect reads the variable with ``TypeAdapter(bool)``)."""
_NAME: Final = re.compile(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?:[\[(<>=!~;@]|$)")
"""A PEP 508 requirement's name, and what may follow it."""
ENGINE: Final = ("python", "-m", "prefect.engine")
"""The engine command under ``uv run``: the project environment's interpreter."""


def working_directory(pull_steps: Any, start: str) -> str | None:
    """Where the pull steps leave the flow, if the worker can know before they run: ``start``
    without steps, the last literal ``set_working_directory`` (relative to where the one
    before left it, as ``os.chdir``) with only those; None when a step decides at run time."""
    if not pull_steps:
        return start
    if not isinstance(pull_steps, list):
        return None
    here = start
    for step in pull_steps:
        if not isinstance(step, dict) or len(step) != 1:
            return None
        ((name, args),) = step.items()
        directory = args.get("directory") if isinstance(args, dict) else None
        if name not in SET_WORKING_DIRECTORY or not isinstance(directory, str) or "{{" in directory:
            return None
        here = os.path.join(here, directory)
    return here


@attrs.frozen
class InterpreterDirs:
    """The engine interpreter's own directories (resolved), kept off ``PYTHONPATH`` as
    Prefect keeps its interpreter's: reordering them could shadow the standard library."""

    stdlib: tuple[str, ...] = ()
    site: tuple[str, ...] = ()
    zip_name: str = ""
    """``pythonXY.zip``: the standard library's archive, beside a stdlib directory."""

    def owns(self, resolved: str) -> bool:
        """Whether a resolved ``PYTHONPATH`` entry is the interpreter's (its site-packages
        or standard library, not a directory inside site-packages)."""
        if resolved in self.site:
            return True
        if any(resolved.startswith(site + os.sep) for site in self.site):
            return False
        if any(resolved == root or resolved.startswith(root + os.sep) for root in self.stdlib):
            return True
        head, tail = os.path.split(resolved)
        return (
            bool(self.zip_name)
            and tail == self.zip_name
            and head in {os.path.dirname(r) for r in self.stdlib}
        )


def pythonpath(working_dir: str, existing: str | None, owned: Callable[[str], bool]) -> str:
    """The run's ``PYTHONPATH``: the working directory, then the entries it had, each once,
    without empty entries and the interpreter's own directories (``owned``)."""
    entries: list[str] = []
    for entry in [working_dir, *(existing.split(os.pathsep) if existing else [])]:
        if entry and entry not in entries and not owned(entry):
            entries.append(entry)
    return os.pathsep.join(entries)


def auto_install(value: str | None) -> bool:
    """``PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES`` read as Prefect reads it: a pydantic bool;
    absent or unreadable is off (the setting's default)."""
    return value is not None and value.lower() in _TRUE


def requirement_name(requirement: str) -> str | None:
    """The normalized name of a PEP 508 requirement (``Prefect[aws]>=3`` → ``prefect``)."""
    found = _NAME.match(requirement)
    return re.sub(r"[-_.]+", "-", found[1]).lower() if found else None


def declares_prefect(pyproject: str) -> bool:
    """Whether a ``pyproject.toml`` lists ``prefect`` in ``[project] dependencies``
    (Prefect's condition for ``uv run``); a file that is not TOML does not."""
    try:
        project = tomllib.loads(pyproject).get("project")
    except tomllib.TOMLDecodeError:
        return False
    dependencies = project.get("dependencies") if isinstance(project, dict) else None
    if not isinstance(dependencies, list):
        return False
    return any(isinstance(d, str) and requirement_name(d) == "prefect" for d in dependencies)


def uv_run(uv: str, project_root: str, engine: Sequence[str] = ENGINE) -> list[str]:
    """Prefect 3.9.1's launch of a project that brings its own dependencies."""
    return [uv, "run", "--no-default-groups", "--project", project_root, *engine]


def is_uv_run(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is a launch by :func:`uv_run`."""
    return (
        len(argv) > 4
        and os.path.basename(argv[0]) == "uv"
        and list(argv[1:4])
        == [
            "run",
            "--no-default-groups",
            "--project",
        ]
    )
