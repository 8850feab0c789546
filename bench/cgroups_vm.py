"""The worker's own CPU per run with per-run cgroups on, and off (/proc sampling), side by side in one VM.

Issue 23's last goal: "Worker CPU per run with cgroups on is lower than with /proc
sampling (bench, same VM)". Run through ``bench/cgroups-vm`` (as root: it boots the VM of
``tests/vm.py``, with the ``.deb`` built from this checkout installed, as in
``tests/test_cgroups_vm.py``, whose helpers this uses). One Prefect server on the host.

**Side by side, not one after the other.** Two instances of the shipped unit run at once
in the one VM: ``flow-worker@vm`` with cgroups on (the default) and ``flow-worker@vm-off``
with ``cgroups = false``, each serving a pool of its own, and both are measured over the
same seconds. The VM is emulated (TCG) on the host's 2 cores, beside the server: measured
one setting after the other, every figure grew with time in the boot (by up to 2x over
six batches, whatever the setting: the server's database grows, the host gets busier,
and the guest's CPU accounting follows the host's wall clock), which drowned the
difference sought. Two workers measured in the same window see the same guest, host and
server. The ``off`` unit runs as a user of its own (a drop-in), so that its ``/proc`` pass
sees only its own runs (the unit's ``ProtectProc=invisible``), as a lone worker's would.

Before the rounds, one warm-up run per pool that holds 64 MiB for a second
(``vm_flows.py hold``): the peak memory each worker reports for it (``memory.peak`` with
cgroups, else its /proc samples) beside the run's own ``VmHWM``. Then ``--rounds`` rounds:

1. idle: both workers' CPU over ``--idle`` seconds (their idle rates);
2. a batch: ``--runs`` fake-engine runs (``fake_engine.py``, each sleeping ``--sleep`` s)
   in each pool, created interleaved (which pool's run first alternates by round), all
   COMPLETED, their ``run.exited`` said and nothing of them left; both workers' CPU over
   the batch's window.

A worker's CPU is ``utime + stime`` of its unit's MainPID (``/proc/PID/stat``, read in the
guest: all its threads, not its children). Per run: the batches' CPU over every round,
divided by the runs; also with each worker's idle rate over the windows taken off.
Prints a markdown table and adds it to ``bench/results/YYYY-MM-DD-cgroups-cpu.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Final

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import Api, running_server, wait_for  # noqa: E402
from tests.test_cgroups_vm import (  # noqa: E402
    SETTINGS,
    Flows,
    configure,
    event,
    first_said,
    flow_worker_processes,
    installed_vm,
    show,
    tail,
)
from tests.vm import Vm, why_not_available  # noqa: E402

MODES: Final = ("on", "off")
POOLS: Final = {"on": "vm", "off": "vm-off"}
OFF_USER: Final = "flow-worker-off"
"""The ``off`` unit's own user (a drop-in): its ``/proc`` pass sees only its own runs."""
HOLD_MIB: Final = 64


def unit(mode: str) -> str:
    return f"flow-worker@{POOLS[mode]}.service"


def worker_times(box: Vm, pid: str, tick: int) -> tuple[float, float]:
    """``utime`` and ``stime`` of the worker process, in seconds (its children are not counted)."""
    fields = box.sh(f"cat /proc/{pid}/stat").rpartition(")")[2].split()
    return int(fields[11]) / tick, int(fields[12]) / tick  # fields 14 and 15 of proc(5)


def both_cpu(box: Vm, pids: dict[str, str], tick: int) -> dict[str, float]:
    return {mode: sum(worker_times(box, pid, tick)) for mode, pid in pids.items()}


def nothing_left(box: Vm, pids: dict[str, str]) -> bool:
    """No run's cgroup, and each worker's user runs only the worker (and, with cgroups, its
    dead man's switch: ``sh`` waiting on ``cat``)."""
    cgroups = box.sh(f"ls -d '/sys/fs/cgroup{show(box, 'ControlGroup', unit('on'))}'/run-* 2>/dev/null; true")
    on, off = flow_worker_processes(box), flow_worker_processes(box, OFF_USER)
    return (
        not cgroups.split()
        and int(pids["on"]) in on
        and set(on.values()) <= {"flow-worker", "sh", "cat"}
        and list(off) == [int(pids["off"])]
    )


def start_both(box: Vm) -> dict[str, str]:
    """Both units started (the ``off`` one as :data:`OFF_USER`, ``cgroups = false``); their MainPIDs,
    each checked to be where its setting puts it."""
    box.sh(
        f"id -u {OFF_USER} >/dev/null 2>&1 || "
        f"useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {OFF_USER}; "
        f"mkdir -p /etc/systemd/system/{unit('off')}.d && printf '%s\\n' '[Service]' "
        f"'User={OFF_USER}' 'Group={OFF_USER}' 'SupplementaryGroups=flow-worker' "
        f"> /etc/systemd/system/{unit('off')}.d/user.conf && systemctl daemon-reload"
    )
    pids = {}
    for mode in MODES:
        configure(box, [*SETTINGS, *(["cgroups = false"] if mode == "off" else [])], pool=POOLS[mode])
        started = box.run("systemctl", "start", unit(mode), timeout=180, check=False)
        assert started.returncode == 0, (
            f"{unit(mode)} did not start: {started.stderr}\n{tail(box, unit=unit(mode))}"
        )
        pid = pids[mode] = show(box, "MainPID", unit(mode))
        cgroup = box.sh(f"cat /proc/{pid}/cgroup").strip()
        assert cgroup.endswith("/worker") == (mode == "on"), f"cgroups {mode}, yet the worker is in {cgroup}"
    return pids


def warm_up(box: Vm, api: Api, pids: dict[str, str]) -> dict[str, tuple[float, float]]:
    """One run per pool holding :data:`HOLD_MIB`: (reported peak, its own VmHWM) in MiB."""
    held = {mode: Flows(api, POOLS[mode]).run(f"hold {HOLD_MIB} 1") for mode in MODES}
    figures = {}
    for mode, run_id in held.items():
        assert api.wait_final(run_id, 300)["state_type"] == "COMPLETED", tail(box, unit=unit(mode))
        end = event(box, run_id, "run.exited", timeout=120)
        figures[mode] = (float(end["PEAK_MEMORY_MIB"]), int(first_said(box, run_id, "VMHWM")) / 1024)
    wait_for(lambda: nothing_left(box, pids), 120, 0.5, what="the warm-up runs gone")
    return figures


def round_(
    box: Vm, api: Api, pids: dict[str, str], tick: int, runs: int, sleep: float, idle: float, first: str
) -> dict[str, dict[str, float]]:
    cpu0, t0 = both_cpu(box, pids, tick), time.monotonic()
    time.sleep(idle)
    cpu1, t1 = both_cpu(box, pids, tick), time.monotonic()
    order = sorted(MODES, key=lambda m: m != first)
    flows = {mode: Flows(api, POOLS[mode]) for mode in MODES}
    ids: dict[str, list[str]] = {mode: [] for mode in MODES}
    for _ in range(runs):  # interleaved: neither pool's runs all go first
        for mode in order:
            ids[mode].append(flows[mode].engine(sleep))
    for mode in order:
        for run_id in ids[mode]:
            assert api.wait_final(run_id, 600)["state_type"] == "COMPLETED", tail(box, unit=unit(mode))
    for mode in order:
        for run_id in ids[mode]:
            event(box, run_id, "run.exited", timeout=120)
    wait_for(lambda: nothing_left(box, pids), 120, 0.5, what="every run gone")
    cpu2, t2 = both_cpu(box, pids, tick), time.monotonic()
    for mode in MODES:
        assert show(box, "MainPID", unit(mode)) == pids[mode], (
            f"{unit(mode)} restarted\n{tail(box, unit=unit(mode))}"
        )
    result = {}
    for mode in MODES:
        rate = (cpu1[mode] - cpu0[mode]) / (t1 - t0)
        batch = cpu2[mode] - cpu1[mode]
        result[mode] = {"batch_cpu": batch, "net_cpu": batch - rate * (t2 - t1), "idle_rate": rate}
    result["wall"] = {"s": t2 - t1}
    print(f"[{time.strftime('%H:%M:%S')}] round ({first} first): {result}", flush=True)
    return result


def report(
    rounds: list[dict[str, dict[str, float]]], held: dict[str, tuple[float, float]], runs: int, meta: str
) -> str:
    n = runs * len(rounds)

    def total(mode: str, key: str) -> float:
        return sum(r[mode][key] for r in rounds)

    rows = [
        ("worker CPU per run (ms)", {m: 1000 * total(m, "batch_cpu") / n for m in MODES}, True),
        (
            "worker CPU per run, idle rate taken off (ms)",
            {m: 1000 * total(m, "net_cpu") / n for m in MODES},
            True,
        ),
        ("worker idle CPU (ms per s)", {m: 1000 * total(m, "idle_rate") / len(rounds) for m in MODES}, True),
        (
            f"reported peak memory of a run holding {HOLD_MIB} MiB (MiB)",
            {m: held[m][0] for m in MODES},
            False,
        ),
        ("that run's own VmHWM (MiB)", {m: held[m][1] for m in MODES}, False),
    ]
    lines = [
        meta,
        "",
        "| metric | cgroups on | cgroups off (/proc sampling) | ratio on/off |",
        "|---|---|---|---|",
    ]
    for label, value, ratio in rows:
        r = f"{value['on'] / value['off']:.3g}" if ratio and value["off"] else ""
        lines.append(f"| {label} | {value['on']:.3g} | {value['off']:.3g} | {r} |")
    each = "; ".join(
        f"{1000 * r['on']['batch_cpu'] / runs:.0f} / {1000 * r['off']['batch_cpu'] / runs:.0f}"
        for r in rounds
    )
    lower = sum(r["on"]["batch_cpu"] < r["off"]["batch_cpu"] for r in rounds)
    walls = ", ".join(f"{r['wall']['s']:.0f}" for r in rounds)
    per_run = rows[0][1]
    met = "met" if per_run["on"] < per_run["off"] else "NOT met"
    lines += [
        "",
        f"Round by round, worker CPU per run on / off (ms): {each} (on lower in {lower} of {len(rounds)}); "
        f"batches (s): {walls}.",
        "",
        f"Goal: worker CPU per run with cgroups on lower than with /proc sampling: {met}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="flow runs per pool and round, created together")
    parser.add_argument("--sleep", type=float, default=3.0, help="how long each run sleeps (s)")
    parser.add_argument("--idle", type=float, default=20.0, help="idle measure before each batch (s)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of idle and batch (alternating which pool goes first)"
    )
    args = parser.parse_args()
    reason = why_not_available()
    if reason:
        print(f"cannot boot the VM: {reason}", file=sys.stderr)
        return 2
    started = time.monotonic()
    with running_server(prefix="flow-worker-bench-vm-") as server:
        api = Api(server)
        print(f"Prefect server at {server.api_url}; booting the VM ...", flush=True)
        with installed_vm(server) as box:
            tick = int(box.sh("getconf CLK_TCK"))
            kernel = box.sh("uname -r").strip()
            pids = start_both(box)
            print(f"[{time.strftime('%H:%M:%S')}] workers: {pids}", flush=True)
            held = warm_up(box, api, pids)
            rounds = [
                round_(box, api, pids, tick, args.runs, args.sleep, args.idle, MODES[i % 2])
                for i in range(args.rounds)
            ]
            accel, cpus, memory = box.accel, box.cpus, box.memory_mb
        api.http.close()
    meta = (
        f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC by `bench/cgroups-vm` "
        f"(`--runs {args.runs} --sleep {args.sleep:g} --idle {args.idle:g} --rounds {args.rounds}`): "
        f"one VM ({accel}, {cpus} vCPUs, {memory} MiB, kernel {kernel}, cgroup v2) on a "
        f"{os.cpu_count()}-core host, flow-worker {__import__('worker').__version__} from the .deb; "
        f"two workers side by side in it (cgroups on, and off as a user of its own), measured over "
        f"the same windows; per round {args.runs} fake-engine runs of {args.sleep:g} s in each pool, "
        f"created interleaved. Worker CPU = utime + stime of the unit's MainPID (not its "
        f"children); total {time.monotonic() - started:.0f} s."
    )
    text = report(rounds, held, args.runs, meta)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{datetime.date.today():%Y-%m-%d}-cgroups-cpu.md"
    with path.open("a") as results_file:  # the day's runs, one after the other
        results_file.write(("\n" if results_file.tell() else "") + text)
    print(f"added to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
