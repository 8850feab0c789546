"""Drive the demo (see scripts/demo). Uses only the standard library and httpx."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLOWS = ROOT / "tests" / "flows"


def call(api: httpx.Client, method: str, path: str, **kwargs: object) -> dict:
    """One request; a busy SQLite server answers 503 ("database is locked"): ask again."""
    for _ in range(50):
        response = api.request(method, path, **kwargs)
        if response.status_code != 503:
            break
        time.sleep(0.2)
    return response.raise_for_status().json()


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="flow-worker-demo-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    print(f"starting a Prefect server on {api_url} (SQLite in {home}) ...", flush=True)
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=(home / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    env["PREFECT_API_URL"] = api_url
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                print((home / "server.log").read_text()[-2000:], file=sys.stderr)
                return 1
            time.sleep(0.5)
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "demo", "--type", "process"],
                       env=env, check=True, capture_output=True)
        api = httpx.Client(base_url=api_url + "/", timeout=30)
        flow_id = call(api, "POST", "flows/", json={"name": "hello"})["id"]
        dep = call(api, "POST", "deployments/", json={
            "name": "demo", "flow_id": flow_id, "work_pool_name": "demo", "entrypoint": "hello.py:hello",
            "path": str(FLOWS),
            "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(FLOWS)}}],
        })["id"]
        runs = [
            call(api, "POST", f"deployments/{dep}/create_flow_run", json={"parameters": {"name": n}})
            for n in ("Ada", "Grace", "Linus")
        ]
        print(f"created {len(runs)} runs of deployment hello/demo; running: flow-worker --pool demo --once", flush=True)
        worker_env = {**env, "FLOW_WORKER_LOG_FORMAT": os.environ.get("FLOW_WORKER_LOG_FORMAT", "console")}
        rc = subprocess.run([str(BIN / "flow-worker"), "--pool", "demo", "--once"], env=worker_env).returncode
        print(f"\nflow-worker exited {rc}. Final states:")
        for run in runs:
            state = call(api, "GET", f"flow_runs/{run['id']}")["state"]
            print(f"  {run['name']:<24} {state['type']:<10} {state.get('message') or ''}")
        return rc
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)
        print("Prefect server stopped.")


if __name__ == "__main__":
    sys.exit(main())
