"""A Debian bookworm container with a real systemd as PID 1, for the systemd tests.

The method is the one of ``shared/systemd-kit/nspawn-check.sh``: a debootstrapped rootfs
(cached as a tarball between runs), ``systemd-nspawn -b`` without machined
(``--register=no --keep-unit``) in a private cgroup, the container's PID 1 found among
nspawn's children, commands run inside with ``nsenter``. The container shares the host's
network, so it reaches a Prefect server on the host's loopback.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

SUITE = "bookworm"
CACHE = Path(
    os.environ.get("FLOW_WORKER_ROOTFS_CACHE", "/var/cache/flow-worker-tests/bookworm-rootfs.tar.zst")
)
HOST_PACKAGES = {
    "systemd-nspawn": "systemd-container",
    "nsenter": "util-linux",
    "debootstrap": "debootstrap",
    "zstd": "zstd",
}


def why_not_available() -> str | None:
    """None if the test can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn)"
    missing = [pkg for cmd, pkg in HOST_PACKAGES.items() if shutil.which(cmd) is None]
    if missing:
        return f"missing host packages: {' '.join(sorted(set(missing)))} (.ci/run installs them)"
    return None


def mirror() -> str:
    for path in Path("/etc/apt/sources.list.d").glob("*.sources"):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and line.rstrip().endswith("debian"):
                return line.split(":", 1)[1].strip()
    for line in (
        Path("/etc/apt/sources.list").read_text().splitlines()
        if Path("/etc/apt/sources.list").exists()
        else []
    ):
        parts = line.split()
        if len(parts) > 2 and parts[0] == "deb":
            return parts[1]
    return "http://deb.debian.org/debian"


def build_rootfs(root: Path, log: Path) -> None:
    """Unpack the cached rootfs, or debootstrap one and cache it."""
    root.mkdir(parents=True)
    if CACHE.exists():
        subprocess.run(f"zstd -dc {CACHE} | tar -C {root} -xf -", shell=True, check=True)
        return
    with log.open("wb") as out:
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=systemd,systemd-sysv,dbus,python3",
                SUITE,
                str(root),
                mirror(),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for item in (root / sub).glob("*"):
            if item.is_file():
                item.unlink()
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = CACHE.with_suffix(".tmp")
    subprocess.run(f"tar -C {root} -cf - . | zstd -T0 -q -o {tmp}", shell=True, check=True)
    tmp.rename(CACHE)


class Container:
    def __init__(self, work: Path, payload: Path) -> None:
        self.work = work
        self.payload = payload
        self.name = f"fw{uuid.uuid4().hex[:8]}"
        self.root = work / "rootfs"
        self.console = work / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self.cgroup: Path | None = None

    def _isolate_cgroup(self) -> None:
        """Give nspawn a private cgroup (the host is not run by systemd)."""
        if os.path.ismount("/sys/fs/cgroup/systemd"):
            self.cgroup = Path("/sys/fs/cgroup/systemd") / f"nspawn-{self.name}"
        elif Path("/sys/fs/cgroup/cgroup.procs").exists() and not Path("/run/systemd/system").exists():
            rel = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[-1]
            if rel == "/":
                self.cgroup = Path("/sys/fs/cgroup") / f"nspawn-{self.name}"

    def boot(self) -> None:
        build_rootfs(self.root, self.work / "debootstrap.log")
        self._isolate_cgroup()
        args = [
            "systemd-nspawn",
            "-q",
            "-b",
            "--register=no",
            "--keep-unit",
            "-M",
            self.name,
            "--console=read-only",
            f"--bind-ro={self.payload}:/opt/payload",
            "-D",
            str(self.root),
        ]
        cgroup = self.cgroup

        def enter_cgroup() -> None:
            if cgroup is not None:
                cgroup.mkdir(exist_ok=True)
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self.console.open("wb"),
            stderr=subprocess.STDOUT,
            preexec_fn=enter_cgroup,
        )
        nspawn_exe = os.readlink(f"/proc/{self.proc.pid}/exe")
        deadline = time.monotonic() + 30
        while self.leader is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {self.console.read_text()[-2000:]}")
            for child in _children(self.proc.pid):
                try:
                    status = Path(f"/proc/{child}/status").read_text()
                    exe = os.readlink(f"/proc/{child}/exe")
                except OSError:
                    continue
                nspid = next((line.split() for line in status.splitlines() if line.startswith("NSpid:")), [])
                if len(nspid) == 3 and nspid[2] == "1" and exe != nspawn_exe:
                    self.leader = child
            if time.monotonic() > deadline:
                raise RuntimeError("no container PID 1 found")
            time.sleep(0.05)
        state = ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            state = self.run(
                "timeout", "60", "systemctl", "is-system-running", "--wait", check=False
            ).stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.2)
        if state not in ("running", "degraded"):
            raise RuntimeError(f"container did not boot: state {state!r}")

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        assert self.leader is not None
        return subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "-r", "-w", *cmd],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> str:
        return self.run("sh", "-c", script, check=check, timeout=timeout).stdout

    def shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn -> SIGRTMIN+3 -> orderly halt
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.cgroup is not None and self.cgroup.exists():
            for d in sorted(self.cgroup.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if d.is_dir():
                    d.rmdir()
            self.cgroup.rmdir()
        shutil.rmtree(self.root, ignore_errors=True)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out
