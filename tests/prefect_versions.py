"""The Prefect releases flow-worker is tested against, and a cached venv for each.

An old Prefect release does not start with today's dependencies (today's fastapi and
pydantic stop the 3.0-3.4 servers at start-up), so each venv is resolved by uv with
``--exclude-newer`` set to the day after that release: the dependency versions a user
installing it then would have got. The venv holds the server and the flows' engine of
the same version. Venvs are cached (``FLOW_WORKER_PREFECT_VENVS``, default
``~/.cache/flow-worker/prefect``) and rebuilt only when missing or incomplete.

Run ``python -m tests.prefect_versions [VERSION ...]`` to build them ahead of the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

VERSIONS: dict[str, str] = {
    # version: the day after its upload to PyPI (uv's --exclude-newer)
    "3.0.11": "2024-10-26",
    "3.2.15": "2025-03-29",
    "3.4.25": "2025-10-24",
    "3.6.29": "2026-05-02",
    "3.8.8": "2026-10-07",
    "3.9.0": "2026-10-22",
    "3.9.1": "2026-10-31",
}
"""The compatibility matrix: the newest patch of 3.0, 3.2, 3.4, 3.6 and 3.8, then 3.9.0
and 3.9.1 (3.9.1 is the first release whose polled runs carry ``state``)."""

CACHE = Path(os.environ.get("FLOW_WORKER_PREFECT_VENVS", Path.home() / ".cache/flow-worker/prefect"))


def _uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        raise RuntimeError("uv is needed to build the Prefect venvs (pip install uv)")
    return found


def venv_for(version: str) -> Path:
    """The venv of Prefect ``version`` (built now if missing). Returns its ``bin`` dir."""
    target = CACHE / version
    stamp = target / ".complete"
    if not stamp.exists():
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "UV_NO_CONFIG": "1"}
        py = os.environ.get("FLOW_WORKER_PREFECT_PYTHON", sys.executable)
        subprocess.run(
            [_uv(), "venv", "-q", "--seed", "--python", py, str(target)],
            check=True,
            env=env,
        )
        subprocess.run(
            [
                _uv(),
                "pip",
                "install",
                "-q",
                "--python",
                str(target / "bin" / "python"),
                "--exclude-newer",
                VERSIONS[version],
                f"prefect=={version}",
            ],
            check=True,
            env=env,
        )
        stamp.touch()
    return target / "bin"


if __name__ == "__main__":
    for v in sys.argv[1:] or list(VERSIONS):
        print(v, venv_for(v), flush=True)
