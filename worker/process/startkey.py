"""Which engine server a run may fork from (its start key), or why it must start cold: the
command is exactly ``<python> -m prefect.engine``, the interpreter resolved as a cold start
would resolve it, and the variables an interpreter reads when it starts."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Final

import attrs

from worker.rules import workspace

ENGINE_ARGS: Final = ("-m", "prefect.engine")
START_PREFIXES: Final = ("PYTHON", "LC_", "LD_")
START_NAMES: Final = frozenset({"LANG", "LANGUAGE", "HOME", "TZ"})


def read_at_start(name: str) -> bool:
    """Whether an interpreter reads ``name`` when it starts, so a forked run cannot take a
    new value of it (``PYTHONPATH`` can: the run's ``sys.path`` is rebuilt)."""
    return name != "PYTHONPATH" and (name.startswith(START_PREFIXES) or name in START_NAMES)


@attrs.frozen
class Key:
    """Which engine server a run forks from."""

    python: str
    start_env: tuple[tuple[str, str], ...]

    def server_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The server's environment: ``environ`` with this key's start-time variables."""
        env = {k: v for k, v in environ.items() if not read_at_start(k) and k != "PYTHONPATH"}
        env.update(self.start_env)
        return env


def start_key(argv: list[str], env: Mapping[str, str], cwd: str) -> Key | str:
    """The server a run with this command, environment and directory may fork from, or
    why it must start cold (pure, but for resolving a bare interpreter name on PATH)."""
    if workspace.is_uv_run(argv):
        return "the run starts through `uv run` in its project's environment (auto-install dependencies)"
    if len(argv) != 3 or tuple(argv[1:]) != ENGINE_ARGS:
        return "the run's command is not `<python> -m prefect.engine`"
    python = argv[0]
    if "/" in python:
        resolved = os.path.join(cwd, python)
    else:
        found = shutil.which(python, path=env.get("PATH", os.defpath))
        if found is None:
            return f"{python!r} is not on the run's PATH"
        resolved = os.path.abspath(found)
    start_env = tuple(sorted((k, v) for k, v in env.items() if read_at_start(k)))
    return Key(resolved, start_env)
