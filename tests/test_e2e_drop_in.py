"""The rest of the drop-in (issue 21), on a real server: a host configured the Prefect way, a
`prefect.toml` in the start directory, a flow's own subprocesses importing the project, and
a deployment that brings its own dependencies through `uv run`; side by side with
`prefect worker start --run-once` where the behaviour is Prefect's."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import textwrap
import uuid
import zipfile
from pathlib import Path
from typing import Any

from tests.conftest import BIN, Api, PrefectServer

SET_WD = "prefect.deployments.steps.set_working_directory"
FLOW = """
import json, os, subprocess, sys
from prefect import flow
from prefect.settings import get_current_settings


@flow
def prefect_settings(out: str) -> None:
    s = get_current_settings()
    record = {"persist_by_default": s.results.persist_by_default, "api_url": s.api.url}
    with open(out, "w") as f:
        f.write(json.dumps(record))


@flow
def runs_helper(out: str) -> None:
    subprocess.run([sys.executable, "tools/helper.py", out], check=True)
"""
HELPER = """
import os, sys
import projectmod  # at the project root: on PYTHONPATH, not beside this script
with open(sys.argv[1], "w") as f:
    f.write(projectmod.VALUE + " " + os.environ.get("PYTHONPATH", ""))
"""
USES_MYLIB = """
import json, sys
import mylib  # the project's own dependency: not in the worker's interpreter
from prefect import flow


@flow
def uses_mylib(out: str) -> None:
    with open(out, "w") as f:
        f.write(json.dumps({"value": mylib.VALUE, "executable": sys.executable}))
"""


def project(root: Path) -> Path:
    """Flows, a module at the project root and a helper script in tools/."""
    (root / "tools").mkdir(parents=True)
    (root / "flows.py").write_text(FLOW)
    (root / "projectmod.py").write_text("VALUE = 'project-root-module'\n")
    (root / "tools" / "helper.py").write_text(HELPER)
    return root


def wheel(directory: Path) -> Path:
    """A tiny wheel of ``mylib``: a local dependency, installed without a network or a build."""
    files = {
        "mylib/__init__.py": "VALUE = 'from mylib'\n",
        "mylib-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: mylib\nVersion: 0.1\n",
        "mylib-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    path = directory / "mylib-0.1-py3-none-any.whl"
    directory.mkdir(parents=True, exist_ok=True)
    record = []
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(text)}")
        archive.writestr(
            "mylib-0.1.dist-info/RECORD", "\n".join([*record, "mylib-0.1.dist-info/RECORD,,", ""])
        )
    return path


def uv_project(root: Path) -> Path:
    """A project that declares prefect and a local dependency, ready for `uv run` offline.

    Resolving prefect's own dependencies would need the registry (a universal lock reads
    wheels of every platform), so the test declares prefect's metadata without them and
    lends the project's environment the worker venv's packages (a ``.pth``): uv still
    locks, creates the environment and installs prefect and ``mylib`` into it."""
    root.mkdir(parents=True)
    (root / "flow.py").write_text(USES_MYLIB)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [project]
            name = "brings-its-own"
            version = "0"
            requires-python = ">=3.11"
            dependencies = ["prefect==3.9.1", "mylib"]

            [tool.uv.sources]
            mylib = {{ path = "{wheel(root.parent / "wheels")}" }}

            [[tool.uv.dependency-metadata]]
            name = "prefect"
            version = "3.9.1"
            requires-dist = []
            """
        )
    )
    subprocess.run(
        [str(BIN / "uv"), "venv", "-q", "--python", str(BIN / "python"), str(root / ".venv")], check=True
    )
    (purelib(root / ".venv" / "bin" / "python") / "_worker_venv.pth").write_text(
        f"{purelib(BIN / 'python')}\n"
    )
    return root


def purelib(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(
        subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    )


def deploy(api: Api, pool: str, root: Path, entrypoint: str, env: dict[str, str] | None = None) -> str:
    body = {
        "name": f"dep-{uuid.uuid4().hex[:8]}",
        "flow_id": api.flow_id(entrypoint.rsplit(":", 1)[1]),
        "work_pool_name": pool,
        "entrypoint": entrypoint,
        "path": str(root),
        "pull_steps": [{SET_WD: {"directory": str(root)}}],
        "job_variables": {"env": env or {}},
        "enforce_parameter_schema": False,
    }
    return str(api.call("POST", "deployments/", body)["id"])


UV_ENV = {"UV_OFFLINE": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
"""uv on the run's PATH (Prefect finds it there), and no registry."""


def runs_of(api: Api, pool: str, tmp: Path) -> dict[str, tuple[str, Path]]:
    """The four runs each worker is given: name → (run id, where the flow writes)."""
    api.create_pool_with_cli(pool)
    code = project(tmp / "project")
    brings = uv_project(tmp / "brings")
    auto = {**UV_ENV, "PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES": "true"}
    plan = {
        "settings": deploy(api, pool, code, "flows.py:prefect_settings"),
        "helper": deploy(api, pool, code, "flows.py:runs_helper"),
        "uv": deploy(api, pool, brings, "flow.py:uses_mylib", auto),
        "no uv": deploy(api, pool, brings, "flow.py:uses_mylib", UV_ENV),
    }
    return {
        name: (api.run(dep, {"out": str(tmp / f"{name}.out")}), tmp / f"{name}.out")
        for name, dep in plan.items()
    }


def start_dir(tmp: Path) -> Path:
    """Where both workers start: a prefect.toml that makes results persist by default."""
    where = tmp / "start"
    where.mkdir()
    (where / "prefect.toml").write_text("[results]\npersist_by_default = true\n")
    return where


def check(api: Api, runs: dict[str, tuple[str, Path]]) -> dict[str, Any]:
    states = {name: api.wait_final(run_id, 300) for name, (run_id, _) in runs.items()}
    for name in ("settings", "helper", "uv"):
        assert states[name]["state_type"] == "COMPLETED", (name, states[name]["state"])
    assert json.loads(runs["settings"][1].read_text())["persist_by_default"] is True  # from prefect.toml
    value, pythonpath = runs["helper"][1].read_text().split(" ", 1)
    assert value == "project-root-module"
    uv = json.loads(runs["uv"][1].read_text())
    assert uv["value"] == "from mylib" and "/brings/.venv/" in uv["executable"]  # the project's environment
    assert states["no uv"]["state_type"] in ("CRASHED", "FAILED")
    assert not runs["no uv"][1].exists()
    return {"pythonpath": pythonpath.split(os.pathsep)[0], "no uv": states["no uv"]}


def logs(api: Api, run_id: str) -> str:
    found = api.call("POST", "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    return "\n".join(entry["message"] for entry in found)


def test_side_by_side_with_prefects_worker(
    prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path
) -> None:
    """prefect.toml's settings reach the flow, a flow's helper imports the project, a project
    brings its own dependencies through `uv run` and fails without: as under Prefect's worker."""
    env = {**prefect_server.env, "PREFECT_LOGGING_LEVEL": "INFO"}
    theirs = runs_of(api, f"{pool_name}-prefect", tmp_path / "prefect")
    prefect = subprocess.run(
        [str(BIN / "prefect"), "worker", "start", "--pool", f"{pool_name}-prefect", "--run-once"],
        env=env,
        cwd=start_dir(tmp_path / "prefect"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert prefect.returncode == 0, prefect.stderr[-3000:]
    their = check(api, theirs)

    ours = runs_of(api, f"{pool_name}-fw", tmp_path / "fw")
    fw = subprocess.run(
        [str(BIN / "flow-worker"), "--pool", f"{pool_name}-fw", "--run-once"],
        env={**env, "FLOW_WORKER_LOG_FORMAT": "json", "FLOW_WORKER_STATE_DIR": str(tmp_path / "state")},
        cwd=start_dir(tmp_path / "fw"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fw.returncode == 0, fw.stderr[-3000:]
    our = check(api, ours)

    assert their["pythonpath"].endswith("/prefect/project") and our["pythonpath"].endswith("/fw/project")
    assert "No module named 'mylib'" in logs(api, theirs["no uv"][0])
    assert "No module named 'mylib'" in our["no uv"]["state"]["message"]  # its stderr tail
    events = [json.loads(line) for line in fw.stderr.splitlines() if line.startswith("{")]
    started = {e["flow_run_id"]: e for e in events if e.get("event") == "run.started"}
    brings = tmp_path / "fw" / "brings"
    uv_run = f"{BIN / 'uv'} run --no-default-groups --project {brings.resolve()} python -m prefect.engine"
    assert started[ours["uv"][0]]["command"] == uv_run
    assert started[ours["no uv"][0]]["command"].endswith(" -m prefect.engine")
    assert started[ours["uv"][0]]["start"] == "cold"  # a warm start cannot fork another environment


def test_a_host_configured_by_prefect_config_set(
    prefect_server: PrefectServer, api: Api, pool_name: str, tmp_path: Path
) -> None:
    """No PREFECT_API_URL in the worker's environment: `prefect config set` under the
    service user's PREFECT_HOME is enough, for the worker and for its flows."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in prefect_server.env.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(home)
    subprocess.run(
        [str(BIN / "prefect"), "config", "set", f"PREFECT_API_URL={prefect_server.api_url}"],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert prefect_server.api_url in (home / "profiles.toml").read_text()
    api.create_pool_with_cli(pool_name)
    code = project(tmp_path / "project")
    out = tmp_path / "settings.out"
    run_id = api.run(deploy(api, pool_name, code, "flows.py:prefect_settings"), {"out": str(out)})
    done = subprocess.run(
        [str(BIN / "flow-worker"), "--pool", pool_name, "--once"],
        env={**env, "FLOW_WORKER_STATE_DIR": str(tmp_path / "state")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert api.flow_run(run_id)["state_type"] == "COMPLETED"
    assert json.loads(out.read_text())["api_url"] == prefect_server.api_url
