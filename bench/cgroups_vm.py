"""The worker's own CPU per run with per-run cgroups on, and off (/proc sampling), in one VM.

Issue 23's last goal: "Worker CPU per run with cgroups on is lower than with /proc
sampling (bench, same VM)". Run through ``bench/cgroups-vm`` (as root: it boots the VM of
``tests/vm.py``). One Prefect server on the host, one VM booted with the ``.deb`` built
from this checkout installed, as in ``tests/test_cgroups_vm.py`` (whose helpers this
uses); its ``flow-worker@vm`` unit serves the pool. For each setting, cgroups on (the
default) then ``cgroups = false`` in ``/etc/flow-worker/vm.toml`` and the unit restarted:

1. one warm-up run that holds 64 MiB for a second (``vm_flows.py hold``): the peak memory
   the worker reports for it (``memory.peak`` with cgroups, else its /proc samples) beside
   the run's own ``VmHWM``;
2. the worker idle for a while: its idle CPU rate;
3. N fake-engine runs (``fake_engine.py``, each sleeping some seconds) created together,
   all COMPLETED, their ``run.exited`` said and nothing of them left.

The worker's CPU is ``utime + stime`` of the unit's MainPID (``/proc/PID/stat``, read in
the guest: all its threads, not its children), before and after the N runs, divided by N;
also with the idle rate over the batch's wall time taken off. Prints a markdown table and
adds it to ``bench/results/YYYY-MM-DD-cgroups-cpu.md`` (the day's runs, in order).
``--first off`` measures the other order (the first setting's batch also pays for a
colder guest); ``--rounds K`` measures both settings K times in one boot, the order
alternating, and gives the medians (single runs moved by a third between runs of one build).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Final

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import spy  # noqa: E402
from tests.conftest import Api, running_server, wait_for  # noqa: E402
from tests.test_cgroups_vm import (  # noqa: E402
    SETTINGS,
    UNIT,
    Flows,
    configure,
    event,
    first_said,
    installed_vm,
    only_the_worker_left,
    show,
    start,
    tail,
)
from tests.vm import Vm, why_not_available  # noqa: E402

MODES = ("on", "off")
HOLD_MIB = 64


def worker_times(box: Vm, pid: str, tick: int) -> tuple[float, float]:
    """``utime`` and ``stime`` of the worker process, in seconds (its children are not counted)."""
    fields = box.sh(f"cat /proc/{pid}/stat").rpartition(")")[2].split()
    return int(fields[11]) / tick, int(fields[12]) / tick  # fields 14 and 15 of proc(5)


def worker_cpu(box: Vm, pid: str, tick: int) -> float:
    return sum(worker_times(box, pid, tick))


PROFILE: Final = "/tmp/flow-worker-profile.txt"


def switch(box: Vm, mode: str) -> str:
    """The unit (re)started with cgroups on or off; its MainPID, checked to be where that puts it."""
    configure(box, [*SETTINGS, *(["cgroups = false"] if mode == "off" else [])])
    if show(box, "ActiveState") == "active":
        restarted = box.run("systemctl", "restart", UNIT, timeout=180, check=False)
        assert restarted.returncode == 0, f"{UNIT} did not restart: {restarted.stderr}\n{tail(box)}"
    else:
        start(box, UNIT)
    pid = show(box, "MainPID")
    in_worker_cgroup = box.sh(f"cat /proc/{pid}/cgroup").strip().endswith("/worker")
    assert in_worker_cgroup == (mode == "on"), f"cgroups {mode}, yet: {box.sh(f'cat /proc/{pid}/cgroup')}"
    return pid


def measure(
    box: Vm, api: Api, mode: str, runs: int, sleep: float, idle: float, tick: int, sampled: bool = False
) -> dict[str, Any]:
    flows = Flows(api)
    pid = switch(box, mode)
    print(f"[{time.strftime('%H:%M:%S')}] cgroups {mode}: worker pid {pid}", flush=True)

    # ---- warm-up, and what the worker says a run holding HOLD_MIB peaked at
    held = flows.run(f"hold {HOLD_MIB} 1")
    assert api.wait_final(held, 300)["state_type"] == "COMPLETED", tail(box)
    hwm_mib = int(first_said(box, held, "VMHWM")) / 1024
    peak_mib = float(event(box, held, "run.exited")["PEAK_MEMORY_MIB"])
    wait_for(lambda: only_the_worker_left(box), 60, 0.5, what="the warm-up run gone")

    # ---- idle
    cpu0, t0 = worker_cpu(box, pid, tick), time.monotonic()
    time.sleep(idle)
    idle_rate = (worker_cpu(box, pid, tick) - cpu0) / (time.monotonic() - t0)

    # ---- the batch
    print(f"[{time.strftime('%H:%M:%S')}] cgroups {mode}: {runs} runs of {sleep:g} s", flush=True)
    if sampled:  # py-spy samples the worker without stopping it (its own CPU is not the worker's)
        record = shlex.join(spy.command("/opt/payload/py-spy", pid, PROFILE, rate=20))
        box.sh(f"rm -f {PROFILE}; nohup {record} >/tmp/py-spy.log 2>&1 &")
    (user0, system0), t0 = worker_times(box, pid, tick), time.monotonic()
    cpu0 = user0 + system0
    ids = [flows.engine(sleep) for _ in range(runs)]
    for run_id in ids:
        assert api.wait_final(run_id, 600)["state_type"] == "COMPLETED", tail(box)
    for run_id in ids:
        event(box, run_id, "run.exited", timeout=120)
    wait_for(lambda: only_the_worker_left(box), 120, 0.5, what="every run gone")
    (user1, system1), wall = worker_times(box, pid, tick), time.monotonic() - t0
    cpu = user1 + system1 - cpu0
    if sampled:
        box.sh(
            "pkill -INT -x py-spy; for i in $(seq 60); do pgrep -x py-spy >/dev/null || break; sleep 1; done",
            timeout=120,
        )
        summary = spy.top(box.sh(f"cat {PROFILE} 2>/dev/null; true", timeout=300))
        if summary.startswith("0 samples"):
            summary += "\npy-spy said: " + box.sh("tail -c 2000 /tmp/py-spy.log; true")
        Path(f"/tmp/flow-worker-profile-{mode}.txt").write_text(summary + "\n")
        print(f"cgroups {mode}: profile of the batch\n{summary}", flush=True)
    assert show(box, "MainPID") == pid, f"the worker restarted during the batch\n{tail(box)}"
    result = {
        "cpu_per_run_ms": 1000 * cpu / runs,
        "net_cpu_per_run_ms": 1000 * (cpu - idle_rate * wall) / runs,
        "user_per_run_ms": 1000 * (user1 - user0) / runs,
        "system_per_run_ms": 1000 * (system1 - system0) / runs,
        "wall_s": wall,
        "idle_ms_per_s": 1000 * idle_rate,
        "peak_mib": peak_mib,
        "hwm_mib": hwm_mib,
    }
    print(f"[{time.strftime('%H:%M:%S')}] cgroups {mode}: {result}", flush=True)
    return result


def table(results: dict[str, dict[str, Any]], meta: str) -> str:
    on, off = results["on"], results["off"]
    rows = [
        ("worker CPU per run (ms)", "cpu_per_run_ms", True),
        ("worker CPU per run, idle rate taken off (ms)", "net_cpu_per_run_ms", True),
        ("of which user time (ms)", "user_per_run_ms", True),
        ("of which system time (ms)", "system_per_run_ms", True),
        ("worker idle CPU (ms per s)", "idle_ms_per_s", True),
        ("batch: created → all ended and gone (s)", "wall_s", True),
        (f"reported peak memory of a run holding {HOLD_MIB} MiB (MiB)", "peak_mib", False),
        ("that run's own VmHWM (MiB)", "hwm_mib", False),
    ]
    lines = [
        meta,
        "",
        "| metric | cgroups on | cgroups off (/proc sampling) | ratio on/off |",
        "|---|---|---|---|",
    ]
    for label, key, ratio in rows:
        r = f"{on[key] / off[key]:.3g}" if ratio and off[key] else ""
        lines.append(f"| {label} | {on[key]:.3g} | {off[key]:.3g} | {r} |")
    met = "met" if on["cpu_per_run_ms"] < off["cpu_per_run_ms"] else "NOT met"
    lines += ["", f"Goal: worker CPU per run with cgroups on lower than with /proc sampling: {met}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="flow runs per setting, created together")
    parser.add_argument("--sleep", type=float, default=3.0, help="how long each run sleeps (s)")
    parser.add_argument("--idle", type=float, default=10.0, help="idle measure before each batch (s)")
    parser.add_argument("--first", choices=MODES, default="on", help="which setting is measured first")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds of both settings in one boot, the order alternating (on off, off on, ...): "
        "the table gives each figure's median, and every round's CPU per run",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="PY_SPY",
        help="a static py-spy binary: sample the worker during each batch (summaries in "
        "/tmp/flow-worker-profile-MODE.txt; the wheel's binary is static)",
    )
    args = parser.parse_args()
    reason = why_not_available()
    if reason:
        print(f"cannot boot the VM: {reason}", file=sys.stderr)
        return 2
    started = time.monotonic()
    rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with running_server(prefix="flow-worker-bench-vm-") as server:
        api = Api(server)
        print(f"Prefect server at {server.api_url}; booting the VM ...", flush=True)
        with installed_vm(server, [args.profile] if args.profile else []) as box:
            tick = int(box.sh("getconf CLK_TCK"))
            kernel = box.sh("uname -r").strip()
            order = sorted(MODES, key=lambda m: m != args.first)
            for round_ in range(args.rounds):  # alternating: neither setting is always the colder
                for mode in order if round_ % 2 == 0 else order[::-1]:
                    sampled = args.profile is not None
                    rounds[mode].append(
                        measure(box, api, mode, args.runs, args.sleep, args.idle, tick, sampled)
                    )
            accel, cpus, memory = box.accel, box.cpus, box.memory_mb
        api.http.close()
    meta = (
        f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC by `bench/cgroups-vm` "
        f"(`--runs {args.runs} --sleep {args.sleep:g} --first {args.first} --rounds {args.rounds}`): "
        f"one VM ({accel}, "
        f"{cpus} vCPUs, {memory} MiB, kernel {kernel}, cgroup v2) on a {os.cpu_count()}-core host, "
        f"flow-worker {__import__('worker').__version__} from the .deb; per setting {args.runs} "
        f"fake-engine runs of {args.sleep:g} s created together, after one warm-up run; cgroups "
        f"{args.first} first. Worker CPU = utime + stime of the unit's MainPID (not its children); "
        f"total {time.monotonic() - started:.0f} s."
    )
    results = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in rounds.items()}
    text = table(results, meta)
    if args.rounds > 1:
        each = "; ".join(
            f"{on['cpu_per_run_ms']:.0f} / {off['cpu_per_run_ms']:.0f}"
            for on, off in zip(rounds["on"], rounds["off"], strict=True)
        )
        text += (
            f"\n{args.rounds} rounds (medians above); worker CPU per run on / off, "
            f"round by round (ms): {each}.\n"
        )
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
