"""Flows for the cgroup VM test (``tests/test_cgroups_vm.py``): what a run does to its cgroup.

Standard library only (the guest has Debian's python3, not prefect). Like the fake engine
(``fake_engine.py``, whose ``propose`` it uses), each reports RUNNING, does its part and
reports COMPLETED over the REST API, and says what it saw on stdout as ``KEY value`` lines,
which the worker logs (``run.output``) and the test reads back from the journal:

    python3 vm_flows.py hold MIB SECONDS  allocate and touch MIB MiB, hold it; VMHWM (kB)
    python3 vm_flows.py oom MIB           allocate MIB MiB, 1 MiB at a time (killed first)
    python3 vm_flows.py busy SECONDS      spin; BUSY wall and own CPU seconds
    python3 vm_flows.py forks N           fork up to N sleepers; FORKED, REFUSED (EAGAIN)
    python3 vm_flows.py daemon SECONDS    double-fork a daemon (new session, empty
                                          environment, sleep 1000); wait
    python3 vm_flows.py nohup SECONDS     leave `nohup sleep 1000 &`; NOHUP pid; wait
    python3 vm_flows.py stubborn SECONDS  ignore SIGTERM, wait (ended only by SIGKILL)
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_engine import propose


def say(key: str, value: object) -> None:
    print(f"{key} {value}", flush=True)


def hwm_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main(what: str, *args: str) -> None:
    propose("RUNNING", "Running")
    if what in ("hold", "oom"):
        chunks = []
        for _ in range(int(args[0])):
            chunks.append(bytearray(1 << 20))  # zero-filled: every page touched
        if what == "hold":
            time.sleep(float(args[1]))
            say("VMHWM", hwm_kib())
    elif what == "busy":
        wall0, cpu0 = time.monotonic(), time.process_time()
        while time.monotonic() - wall0 < float(args[0]):
            pass
        say("BUSY", f"{time.monotonic() - wall0:.3f} {time.process_time() - cpu0:.3f}")
    elif what == "forks":
        pids, refused = [], 0
        for _ in range(int(args[0])):
            try:
                pid = os.fork()
            except BlockingIOError:
                refused += 1
                continue
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            pids.append(pid)
        say("FORKED", len(pids))
        say("REFUSED", refused)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    elif what == "daemon":
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execve("/bin/sleep", ["sleep", "1000"], {})  # no PREFECT__FLOW_RUN_ID: the sweep misses it
            os._exit(0)
        os.wait()
        time.sleep(float(args[0]))
    elif what == "nohup":
        child = subprocess.Popen(
            "nohup sleep 1000 >/dev/null 2>&1 & echo $!", shell=True, stdout=subprocess.PIPE
        )
        say("NOHUP", child.communicate()[0].decode().strip())
        time.sleep(float(args[0]))
    elif what == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(float(args[0]))
    say("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    propose("COMPLETED", "Completed")


if __name__ == "__main__":
    main(*sys.argv[1:])
