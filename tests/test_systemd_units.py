"""sd_notify, the journald encoder and renderer, metrics text: against real unix sockets."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from worker.host import systemd
from worker.host.logs import JournaldRenderer
from worker.host.metrics import Metrics


def datagram_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    return sock


def test_notifier_sends_only_with_notify_socket(tmp_path: Path) -> None:
    assert not systemd.Notifier({}).send(READY="1")
    sock = datagram_socket(tmp_path / "notify")
    n = systemd.Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "6000000"})
    assert n.watchdog_seconds == 6.0
    n.ready("up")
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.extend_timeout(2.5, "draining")
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=2500000\nSTATUS=draining"


def test_watchdog_for_another_pid_is_ignored() -> None:
    n = systemd.Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert n.watchdog_seconds is None or os.getpid() == 1


def test_encode_single_and_multi_line() -> None:
    assert systemd.encode({"A": "b", "N": 3}) == b"A=b\nN=3\n"
    multi = systemd.encode({"M": "x\ny"})
    assert multi == b"M\n" + struct.pack("<Q", 3) + b"x\ny\n"


@pytest.mark.parametrize(
    ("key", "name"), [("flow_run_id", "FLOW_RUN_ID"), ("pid", "PID"), ("_x", "X"), ("9a", "F_9A")]
)
def test_field_names(key: str, name: str) -> None:
    assert systemd.field_name(key) == name


def test_journald_renderer_fields_and_drop(tmp_path: Path) -> None:
    sock = datagram_socket(tmp_path / "journal")
    renderer = JournaldRenderer(systemd.JournalSender(str(tmp_path / "journal")))
    event = {
        "event": "run.reported",
        "level": "warning",
        "timestamp": "t",
        "flow_run_id": "r1",
        "work_pool": "p",
        "message": "the report text",
        "kind": "crash",
    }
    with pytest.raises(structlog.DropEvent):
        renderer(None, "warning", dict(event))
    raw = sock.recv(65536).decode()
    fields = dict(line.split("=", 1) for line in raw.strip().split("\n"))
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "flow-worker"
    assert fields["FLOW_WORKER_EVENT"] == "run.reported"
    assert fields["FLOW_RUN_ID"] == "r1" and fields["WORK_POOL"] == "p"
    assert fields["FLOW_WORKER_MESSAGE"] == "the report text"
    assert fields["MESSAGE"].startswith("run.reported [r1]")
    with pytest.raises(structlog.DropEvent):
        renderer(None, "info", {"event": "run.output", "level": "info", "line": "hello", "flow_run_id": "r1"})
    assert b"MESSAGE=hello\n" in sock.recv(65536)


def test_journald_renderer_falls_back_to_json(tmp_path: Path) -> None:
    renderer = JournaldRenderer(systemd.JournalSender(str(tmp_path / "absent")))
    assert '"event": "x"' in renderer(None, "info", {"event": "x", "level": "info"})


def test_journal_stream_detection(tmp_path: Path) -> None:
    f = (tmp_path / "f").open("w")
    st = os.fstat(f.fileno())
    assert systemd.journal_stream_is_stderr({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f.fileno())
    assert not systemd.journal_stream_is_stderr({"JOURNAL_STREAM": "1:2"}, f.fileno())
    assert not systemd.journal_stream_is_stderr({}, f.fileno())


def test_metrics_parse() -> None:
    m = Metrics(runs_claimed=3)
    m.runs_finished["COMPLETED"] += 2
    m.api_errors["unavailable"] += 1
    m.observe_poll(0.25)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(m.render(active_runs=1, seconds_since_poll=1.5))
        for s in family.samples
    }
    assert samples[("flow_worker_runs_claimed_total", ())] == 3
    assert samples[("flow_worker_runs_finished_total", (("state", "COMPLETED"),))] == 2
    assert samples[("flow_worker_runs_finished_total", (("state", "FAILED"),))] == 0
    assert samples[("flow_worker_api_errors_total", (("kind", "unavailable"),))] == 1
    assert samples[("flow_worker_active_runs", ())] == 1
    assert samples[("flow_worker_poll_duration_seconds_count", ())] == 1


# ---------------------------------------------------------------- the shipped units


def unit_settings(name: str) -> dict[str, str]:
    """``Key=value`` lines of a unit file (the last one wins, as in systemd)."""
    text = (Path(__file__).resolve().parents[1] / "systemd" / name).read_text()
    lines = (line.strip() for line in text.splitlines())
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith(("#", ";")))


@pytest.mark.parametrize("unit", ["flow-worker@.service", "flow-worker-drain@.service"])
def test_units_allow_enough_open_files(unit: str) -> None:
    """systemd's default soft limit (1024) is about 200 live runs; the unit sets the hard
    limit, which the worker takes as its soft one at start."""
    assert int(unit_settings(unit)["LimitNOFILE"]) >= 65536


def test_watchdog_outlasts_the_api_deadline_and_is_pinged_often() -> None:
    from worker.service import liveness

    service = unit_settings("flow-worker@.service")
    watchdog = float(service["WatchdogSec"].removesuffix("s"))
    assert liveness.API_DEADLINE < watchdog  # issue 19: every API call ends within WatchdogSec
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"


HARDENING = (
    "NoNewPrivileges",
    "CapabilityBoundingSet",
    "AmbientCapabilities",
    "RestrictSUIDSGID",
    "UMask",
    "PrivateTmp",
    "ProtectSystem",
    "ProtectHome",
    "PrivateMounts",
    "ProtectClock",
    "ProtectKernelLogs",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectHostname",
    "ProtectProc",
    "PrivateIPC",
    "KeyringMode",
    "RestrictRealtime",
    "LockPersonality",
    "SystemCallArchitectures",
    "SystemCallFilter",
    "SystemCallErrorNumber",
    "RestrictAddressFamilies",
)


def test_the_drain_unit_is_hardened_as_the_daemon() -> None:
    """Issue 24: the same restrictions in both units (the README has one table for both);
    the score of each is checked under real systemd (tests/test_systemd.py)."""
    daemon, drain = unit_settings("flow-worker@.service"), unit_settings("flow-worker-drain@.service")
    assert {k: drain.get(k) for k in HARDENING} == {k: daemon.get(k) for k in HARDENING}
    assert all(k in daemon for k in HARDENING)
    assert drain["StateDirectoryMode"] == daemon["StateDirectoryMode"] == "0700"


def test_only_the_daemon_unit_delegates_its_cgroup() -> None:
    """Issue 23: the daemon's unit delegates its cgroup (per-run cgroups), so it cannot
    also make the cgroup tree read-only (``ProtectControlGroups=`` did so to the delegated
    subtree on systemd 252); the drain unit delegates nothing and keeps the tree read-only,
    so its runs fall back to process groups, said once (README: per-run cgroups)."""
    daemon, drain = unit_settings("flow-worker@.service"), unit_settings("flow-worker-drain@.service")
    assert daemon["Delegate"] == "yes" and "ProtectControlGroups" not in daemon
    assert "Delegate" not in drain and drain["ProtectControlGroups"] == "yes"


@pytest.mark.parametrize("unit", ["flow-worker@.service", "flow-worker-drain@.service"])
def test_hardening_leaves_what_the_worker_and_its_runs_need(unit: str) -> None:
    """What the units must not forbid (the README says why each is left out): runs outlive
    a worker restart (KillMode=process; RemoveIPC would empty the user's /dev/shm under
    them); the worker reads /proc/meminfo and the boot id (ProcSubset=pid), calls setrlimit
    (@resources), prctl, pidfd_open, waitid and kill (@process, @signal), and its runs'
    /proc entries (ProtectProc hides other users' only)."""
    settings = unit_settings(unit)
    assert settings["KillMode"] == "process"
    assert settings.get("RemoveIPC", "no") == "no"
    assert settings.get("ProcSubset", "all") == "all"
    assert settings.get("ProtectProc") == "invisible"
    denied = settings["SystemCallFilter"]
    assert denied.startswith("~")
    assert not {"@resources", "@privileged", "@process", "@signal", "@system-service"} & set(
        denied[1:].split()
    )
