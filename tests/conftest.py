"""Test fixtures: a real Prefect 3.9.1 server on a free loopback port, and helpers to drive it.

The server runs as `prefect server start` (SQLite in a temporary PREFECT_HOME) for the
whole session. Workers run as real `flow-worker` processes against it. Nothing here
imports prefect: the server and the CLI are subprocesses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import hypothesis
import pytest

# Property tests check what is decided, not how fast: on 2 shared cores beside a VM and two
# Prefect servers an example can take longer than hypothesis' 200 ms default deadline.
hypothesis.settings.register_profile("flow-worker", deadline=None)
hypothesis.settings.load_profile("flow-worker")

ROOT = Path(__file__).resolve().parents[1]
FLOWS = ROOT / "tests" / "flows"
BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT = 240.0
"""A server starts in 5-10 s; in CI two pytest runs share 2 cores, and a start beside the
main run's heaviest tests once took over 120 s (the 3.8.8 matrix server, CI 2026-11-30)."""


ENGINE_START: Final = os.environ.get("FLOW_WORKER_TEST_ENGINE_START", "cold")
"""How the workers of this test session start engine runs: ``cold`` (spawned) or ``warm``
(``warm_start = true``); ``scripts/test`` runs the end-to-end suite both ways."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class PrefectServer:
    def __init__(self, home: Path, server_env: dict[str, str] | None = None, bin_dir: Path = BIN) -> None:
        self.home = home
        self.bin_dir = bin_dir
        """Where this server's ``prefect`` (and the flows' engine of the same version) lives."""
        self.server_env = server_env or {}
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log_path = home / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FLOW_WORKER_"))}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="false",
            PREFECT_UI_ENABLED="false",
            PREFECT_LOGGING_LEVEL="WARNING",
            XDG_STATE_HOME=str(self.home / "state"),
        )
        if ENGINE_START == "warm":
            env["FLOW_WORKER_WARM_START"] = "true"
        return env

    def start(self) -> None:
        server_env = {k: v for k, v in self.env.items() if k != "PREFECT_API_URL"} | self.server_env
        self.proc = subprocess.Popen(
            [
                str(self.bin_dir / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=server_env,
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"prefect server exited: {self.log_path.read_text()[-3000:]}")
            try:
                return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(up, SERVER_START_TIMEOUT, 0.1, "the prefect server to answer /api/health")
        except AssertionError as exc:  # say why: the server's own words, not only that it was slow
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"{exc} (port {self.port}); its log ends:\n{tail}") from None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Api:
    """A small synchronous client for the tests' own calls (not the worker's code)."""

    def __init__(self, server: PrefectServer) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.api_url + "/", timeout=30)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        for _ in range(20):  # the SQLite server answers 503 under write contention
            r = self.http.request(method, path, json=body)
            if r.status_code != 503:
                break
            time.sleep(0.2)
        assert r.is_success, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def create_pool_with_cli(self, name: str) -> None:
        subprocess.run(
            [str(self.server.bin_dir / "prefect"), "work-pool", "create", name, "--type", "process"],
            env=self.server.env,
            check=True,
            capture_output=True,
        )

    def flow_id(self, name: str = "hello") -> str:
        return str(self.call("POST", "flows/", {"name": name})["id"])

    def deployment(
        self,
        pool: str,
        *,
        entrypoint: str = "hello.py:hello",
        job_variables: dict[str, Any] | None = None,
        name: str | None = None,
        flow_name: str = "hello",
    ) -> str:
        if self.http.get(f"work_pools/{pool}").status_code == 404:
            try:
                self.create_pool_with_cli(pool)
            except subprocess.CalledProcessError:
                # a worker started by the test may have created it meanwhile
                assert self.http.get(f"work_pools/{pool}").status_code == 200
        body = {
            "name": name or f"dep-{uuid.uuid4().hex[:8]}",
            "flow_id": self.flow_id(flow_name),
            "work_pool_name": pool,
            "entrypoint": entrypoint,
            "path": str(FLOWS),
            "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(FLOWS)}}],
            "job_variables": job_variables or {},
            "enforce_parameter_schema": False,  # no schema is sent; 3.0 enforces by default
        }
        return str(self.call("POST", "deployments/", body)["id"])

    def run(
        self,
        deployment_id: str,
        parameters: dict[str, Any] | None = None,
        job_variables: dict[str, Any] | None = None,
    ) -> str:
        body = {"parameters": parameters or {}, "job_variables": job_variables or {}}
        return str(self.call("POST", f"deployments/{deployment_id}/create_flow_run", body)["id"])

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"flow_runs/{run_id}"))

    def cancel(self, run_id: str) -> None:
        """Ask for the run's cancellation, as the UI's Cancel does (CANCELLING, forced)."""
        state = {"type": "CANCELLING", "name": "Cancelling"}
        self.call("POST", f"flow_runs/{run_id}/set_state", {"state": state, "force": True})

    def state_type(self, run_id: str) -> str:
        return str(self.flow_run(run_id)["state_type"])

    def states(self, run_id: str) -> list[dict[str, Any]]:
        return list(self.call("GET", f"flow_run_states/?flow_run_id={run_id}"))

    def wait_final(self, run_id: str, timeout: float = 120) -> dict[str, Any]:
        final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
        return dict(
            wait_for(
                lambda: (r := self.flow_run(run_id))["state_type"] in final and r,
                timeout,
                0.3,
                f"run {run_id} to reach a final state",
            )
        )


@contextlib.contextmanager
def running_server(
    prefix: str = "flow-worker-prefect-", bin_dir: Path = BIN, database_url: str | None = None
) -> Iterator[PrefectServer]:
    """A Prefect server (of the version in ``bin_dir``) in a temporary home, on SQLite
    there unless ``database_url`` names another database (e.g. PostgreSQL)."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    server_env = {"PREFECT_API_DATABASE_CONNECTION_URL": database_url} if database_url else None
    server = PrefectServer(home, server_env, bin_dir=bin_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[PrefectServer]:
    with running_server() as server:
        yield server


def flow_worker(
    server: PrefectServer, *args: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    """``flow-worker ARGS`` run to its end against ``server``; output captured."""
    return subprocess.run(
        [str(BIN / "flow-worker"), *args],
        env={**server.env, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def api(prefect_server: PrefectServer) -> Iterator[Api]:
    client = Api(prefect_server)
    yield client
    client.http.close()


@pytest.fixture
def pool_name() -> str:
    return f"pool-{uuid.uuid4().hex[:10]}"


class WorkerProcess:
    """A `flow-worker` daemon run as a real subprocess; its JSON log lines are kept."""

    def __init__(self, server: PrefectServer, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        full_env = {**server.env, "FLOW_WORKER_LOG_FORMAT": "json", **env}
        self.proc = subprocess.Popen(
            [str(BIN / "flow-worker"), *args],
            env=full_env,
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def saw(self, event: str, **fields: Any) -> bool:
        return any(
            e.get("event") == event and all(e.get(k) == v for k, v in fields.items()) for e in self.events()
        )

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def start_worker(prefect_server: PrefectServer, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*args: str, **env: str) -> WorkerProcess:
        env.setdefault("FLOW_WORKER_STATE_DIR", str(tmp_path / f"state-{len(started)}"))
        w = WorkerProcess(prefect_server, list(args), env, tmp_path / f"worker-{len(started)}.log")
        started.append(w)
        return w

    yield start
    for w in started:
        try:
            w.stop()
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI (root, CI=true) a skipped test is a failure: every test must really run there."""
    if os.environ.get("CI") != "true":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reporter.write_line(f"CI: {len(skipped)} test(s) were skipped; in CI every test must run.", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
