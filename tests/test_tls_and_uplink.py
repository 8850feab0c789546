"""Pure parts of TLS, headers, Prefect Cloud URLs and the UI uplink (no server)."""

from __future__ import annotations

import collections
import ssl
from pathlib import Path
from typing import Any

import pytest

from worker.host.settings import Settings, SettingsError, validated
from worker.prefect import events, ui
from worker.prefect.answers import ApiNotFound, ApiUnavailable, describe, is_certificate_error
from worker.prefect.session import tls_context
from worker.prefect.throttle import Throttle

CLOUD = "https://api.prefect.cloud/api/accounts/0ff44498-d380-4d7b-bd68-9b52da03823f/workspaces/c5ee4d60-dd3c-4e8b-a1e3-5d2b5c1e2a11"


def test_cloud_and_self_hosted_websocket_urls() -> None:
    assert events.ws_url(CLOUD) == "wss://" + CLOUD.removeprefix("https://") + "/events/out"
    assert events.ws_url("http://127.0.0.1:4200/api/") == "ws://127.0.0.1:4200/api/events/out"
    assert events.auth_frame("pnu_key") == {"type": "auth", "token": "pnu_key"}
    assert events.auth_frame(None) == {"type": "auth", "token": None}


def test_tls_context_trusts_the_system_or_the_given_ca(tmp_path: Path) -> None:
    default = tls_context(Settings(api_url=CLOUD))
    assert default.verify_mode is ssl.CERT_REQUIRED and default.check_hostname
    insecure = tls_context(Settings(api_url=CLOUD, api_tls_insecure_skip_verify=True))
    assert insecure.verify_mode is ssl.CERT_NONE and not insecure.check_hostname


def test_custom_headers_and_cert_file_are_checked(tmp_path: Path) -> None:
    ok = Settings(api_url=CLOUD, pool="p", client_custom_headers='{"X-Env": "prod"}')
    assert validated(ok).custom_headers() == {"X-Env": "prod"}
    assert validated(ok).child_prefect_env()["PREFECT_CLIENT_CUSTOM_HEADERS"] == '{"X-Env": "prod"}'
    with pytest.raises(SettingsError, match=r"PREFECT_CLIENT_CUSTOM_HEADERS.*must be a JSON object"):
        validated(Settings(api_url=CLOUD, pool="p", client_custom_headers='["x"]'))
    with pytest.raises(SettingsError, match="not JSON"):
        validated(Settings(api_url=CLOUD, pool="p", client_custom_headers="{x"))
    with pytest.raises(SettingsError, match="no such file"):
        validated(Settings(api_url=CLOUD, pool="p", api_ssl_cert_file=str(tmp_path / "nope.pem")))


def test_a_refused_certificate_is_recognised() -> None:
    try:
        try:
            raise ssl.SSLCertVerificationError(
                1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
            )
        except ssl.SSLError as inner:
            raise ConnectionError() from inner
    except ConnectionError as outer:
        text = describe(outer)
    assert "CERTIFICATE_VERIFY_FAILED" in text
    assert is_certificate_error(ApiUnavailable("GET", "/x", None, text))
    assert not is_certificate_error(ApiUnavailable("GET", "/x", None, "ConnectError: refused"))


# ---------------------------------------------------------------- the uplink


class Api:
    def __init__(self, fail: Exception | None = None) -> None:
        self.fail, self.sent = fail, []
        self.throttle = Throttle()

    async def request(self, method: str, path: str, json: Any = None, essential: bool = True) -> None:
        if self.fail is not None:
            raise self.fail
        self.sent.append((path, len(json)))


def test_run_log_lines_keep_prefects_wording() -> None:
    claimed = ui.line_for({"event": "run.claimed", "worker_name": "w", "flow_run_id": "r1"}, "w")
    assert claimed == (20, "Worker 'w' submitting flow run 'r1'")
    exited = ui.line_for({"event": "run.exited", "pid": 7, "returncode": 3, "stderr_tail": "boom"}, "w")
    assert exited == (40, "Process 7 exited with status code: 3; last lines of stderr:\nboom")
    assert ui.line_for({"event": "run.output", "line": "x"}, "w") is None


async def test_uplink_is_bounded_and_drops_the_oldest_during_an_outage() -> None:
    client = Api(ApiUnavailable("POST", "/logs/", None, "refused"))
    uplink = ui.Uplink(client, "w", events_in=None)  # type: ignore[arg-type]
    uplink.logs = collections.deque(maxlen=5)
    for i in range(8):
        uplink.add_log("r", 20, f"line {i}")
    await uplink.ship()
    assert [e["message"] for e in uplink.logs] == [f"line {i}" for i in range(3, 8)] and uplink.dropped == 3
    client.fail = None
    await uplink.ship()
    assert client.sent == [("logs/", 5)] and not uplink.logs and uplink.dropped == 0


async def test_a_server_without_events_is_detected_once() -> None:
    client = Api(ApiNotFound("POST", "/events", 404, "Not Found"))
    uplink = ui.Uplink(client, "w", events_in=None)  # type: ignore[arg-type]
    uplink.add_event("prefect.worker.started", [])
    await uplink.ship()
    assert not uplink.events_supported and not uplink.events
    uplink.add_event("prefect.worker.stopped", [])
    assert not uplink.events


def test_log_to_api_false_keeps_nothing() -> None:
    uplink = ui.Uplink(Api(), "w", log_to_api=False, events_in=None)  # type: ignore[arg-type]
    uplink.add_log("r", 20, "x")
    assert not uplink.logs


def test_executed_event_carries_pid_and_status() -> None:
    related = [{"prefect.resource.id": "prefect.flow-run.r", "prefect.resource.role": "flow-run"}]
    out = ui.with_exit(related, 42, 3)
    assert out[0]["prefect.infrastructure.identifier"] == "42"
    assert out[0]["prefect.infrastructure.status-code"] == "3"
    assert (
        ui.worker_resource("ProcessWorker A/b")["prefect.resource.id"]
        == "prefect.worker.process.processworker-a-b"
    )


async def test_entries_queued_while_a_full_batch_is_sent_are_kept() -> None:
    class Slow(Api):
        async def request(self, method: str, path: str, json: Any = None, essential: bool = True) -> None:
            for i in range(3):  # the queue is full: these push the oldest (sent) entries out
                uplink.add_log("r", 20, f"new {i}")
            await super().request(method, path, json)

    client = Slow()
    uplink = ui.Uplink(client, "w", events_in=None)  # type: ignore[arg-type]
    uplink.logs = collections.deque(maxlen=5)
    for i in range(5):
        uplink.add_log("r", 20, f"old {i}")
    await uplink._send("logs/", uplink.logs)
    assert [e["message"] for e in uplink.logs] == ["new 0", "new 1", "new 2"]
