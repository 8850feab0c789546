"""A Debian VM with systemd as PID 1 and a pure cgroup v2 hierarchy, for the cgroup tests (issue 23).

This host is cgroup v1 hybrid and its PID 1 is not systemd, and the nspawn container of
``tests/nspawn.py`` inherits that; a VM does not. The method is the one of
``shared/vm-kit/vm-check.sh``, made reusable:

- **kernel**: Debian's cloud kernel (``linux-image-cloud-amd64``), fetched with ``apt-get
  download`` and unpacked with ``dpkg-deb -x``, never installed on the host;
- **initramfs**: static busybox and the virtio modules (they are modules in that kernel); it
  mounts the root disk (and the payload disk, read-only, at ``/opt/payload``), brings up the
  network, then ``switch_root`` to systemd;
- **root**: the nspawn test's debootstrap rootfs (:func:`tests.nspawn.build_rootfs`, same cache)
  plus the command agent, as an ext4 image (``mkfs.ext4 -d``). The VM writes to a throwaway
  snapshot of it (``snapshot=on``), so the cached image never changes;
- **payload**: what a test gives the guest (the ``.deb`` built from this checkout, flows), as a
  second small ext4 image mounted at ``/opt/payload``, the path the nspawn container binds it to;
- **network**: qemu user networking with ``restrict=on``: the guest reaches nothing but
  ``10.0.2.100:PORT`` for each forwarded port, relayed by ``guestfwd`` (one ``socat`` per
  connection) to ``127.0.0.1:HOST_PORT``, e.g. the session's Prefect server;
- **commands**: a JSON-lines agent in the guest (``tests/vm_agent.py``) on a virtio-serial port,
  whose host end is a Unix socket this module listens on (see :class:`Channel` for why).

The kernel, the initramfs and the root image are cached under ``FLOW_WORKER_VM_CACHE``
(default: ``vm/`` beside the nspawn rootfs cache), each built only when missing; the names of
the initramfs and the root image carry a hash of what they are made from, so a change to the
agent or the init script builds new ones instead of using stale ones.

KVM is used only where it works (:func:`accelerator`); elsewhere qemu's software emulation
(TCG), as on these machines where ``/dev/kvm`` exists but fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Final, NamedTuple

from tests import nspawn

ROOT = Path(__file__).resolve().parents[1]
CACHE: Final = Path(os.environ.get("FLOW_WORKER_VM_CACHE", str(nspawn.CACHE.parent / "vm")))
KERNEL_PACKAGE: Final = "linux-image-cloud-amd64"
"""Debian's kernel for virtual machines: small, boots in seconds, cgroup v2 with every
controller (``cpuset cpu io memory hugetlb pids rdma misc``)."""
HOST_PACKAGES: Final = {
    "qemu-system-x86_64": "qemu-system-x86",
    "socat": "socat",
    "cpio": "cpio",
    "mkfs.ext4": "e2fsprogs",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
    "zstd": "zstd",
    "debootstrap": "debootstrap",
}
"""Commands this harness runs on the host, and the Debian package of each (``.ci/run``
installs them; ``busybox-static`` is checked apart: it must be the static build)."""

MODULES: Final = (
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "drivers/block/virtio_blk",
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
    "drivers/char/virtio_console",
)
"""The kernel modules the initramfs loads, in dependency order (each one's ``depends=``
precedes it): PCI transport, the disks, the network card, the agent's serial port."""

GUEST_IP: Final = "10.0.2.15"
FORWARD_IP: Final = "10.0.2.100"
"""The address at which the guest reaches the host's forwarded ports (vm-check.sh's)."""
AGENT_PORT: Final = "fw.agent"
AGENT_PATH: Final = "/usr/local/lib/flow-worker-vm/agent.py"

MEMORY_MB: Final = int(os.environ.get("FLOW_WORKER_VM_MEMORY_MB", "1536"))
"""The guest's RAM. Room for the issue's OOM test (a run allocating 600 MiB under
``memory_max: 256M``, beside another run and the worker) without the guest itself short;
qemu only takes from the host what the guest touches."""
CPUS: Final = int(os.environ.get("FLOW_WORKER_VM_CPUS", "2"))
"""Two vCPUs: cgroup CPU limits (``cpu_max: 50%``) and a contained fork bomb next to a
busy worker mean something only with more than one CPU. Under TCG each busy vCPU is a host
thread at 100 %, but an idle one halts (no host CPU), and these machines have 2 cores."""
BOOT_TIMEOUT: Final = float(os.environ.get("FLOW_WORKER_VM_BOOT_TIMEOUT", "300"))
"""From qemu's start to ``systemctl is-system-running`` answering. Measured: about 10 s
under TCG on an idle 2-core machine; the rest of the suite runs beside it on the same two
cores and slows emulation several times over."""
POWEROFF_TIMEOUT: Final = 60.0
"""From ``systemctl poweroff`` to qemu's exit (measured: about 2 s). After it qemu is
terminated: the guest writes only to a throwaway snapshot, so pulling the plug loses nothing."""
ANSWER_GRACE: Final = 30.0
"""How much longer than a command's own timeout (enforced in the guest) the host waits for
its answer before taking the guest for hung."""
PROBE_TIMEOUT: Final = 30.0
"""The KVM probe's deadline: a kernel boots to its "no root" panic in about 1 s under KVM."""
IMAGE_SIZE: Final = "2G"
"""The root image (sparse): the rootfs is about 200 MB, flow-worker about 20 MB; the rest is
room for runs, their output and the journal (all written to the snapshot, not the image)."""

INIT: Final = """#!/bin/busybox sh
# tests/vm.py: load the virtio modules, mount the root (and payload) disk, set up the network,
# then hand over to systemd. "fw-vm:" lines go to the console log the harness shows on failure.
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in MODULES; do insmod /mods/$m.ko || echo "fw-vm: insmod $m failed"; done
payload=; grep -q 'fw.payload=1' /proc/cmdline && payload=/dev/vdb
for i in $(seq 100); do  # the disks appear as the modules load; 10 s at most
  [ -b /dev/vda ] && { [ -z "$payload" ] || [ -b "$payload" ]; } && break; sleep 0.1
done
mount -t ext4 /dev/vda /newroot || { echo "fw-vm: cannot mount the root disk /dev/vda"; poweroff -f; }
if [ -n "$payload" ]; then
  mkdir -p /newroot/opt/payload
  mount -t ext4 -o ro "$payload" /newroot/opt/payload || echo "fw-vm: cannot mount the payload disk"
fi
ip link set lo up
for n in $(ls /sys/class/net); do
  [ "$n" = lo ] && continue
  ip link set "$n" up && ip addr add GUEST_IP/24 dev "$n" && echo "fw-vm: $n is GUEST_IP"
  break
done
umount /proc /sys; mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
""".replace("MODULES", " ".join(m.rsplit("/", 1)[1] for m in MODULES)).replace("GUEST_IP", GUEST_IP)
"""The initramfs's ``/init``. The network is configured here, once, because the rootfs has
neither udev nor iproute2 (systemd-networkd would wait for udev forever); it is kernel state,
so it survives ``switch_root``. No default route: anything but the forwarded ports fails at once."""

AGENT_UNIT: Final = f"""[Unit]
Description=command agent of the flow-worker VM tests (tests/vm.py)
DefaultDependencies=no
Conflicts=shutdown.target
Before=shutdown.target
StartLimitIntervalSec=0

[Service]
ExecStart=/usr/bin/python3 {AGENT_PATH}
Restart=always
RestartSec=200ms

[Install]
WantedBy=sysinit.target
"""
"""Started at the very start of boot (no default dependencies), so the host can tell a guest
that never came up from one whose boot is slow, and ask systemd itself when it is done."""
MASKED: Final = (
    "serial-getty@ttyS0.service",  # bound to dev-ttyS0.device, which only udev would announce
    "getty@tty1.service",
    "apt-daily.timer",  # timers that would do work in the middle of a test
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)
HOSTNAME: Final = "flow-worker-vm"
IMAGE_RECIPE: Final = 1
"""Bump when :func:`_customize` changes in a way its constants do not show: a new root image."""


def why_not_available() -> str | None:
    """None if a VM can be booted here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, mkfs.ext4 -d of a rootfs owned by root)"
    missing = {pkg for cmd, pkg in HOST_PACKAGES.items() if shutil.which(cmd) is None}
    busybox = shutil.which("busybox")
    if busybox is None or not _static(Path(busybox)):
        missing.add("busybox-static")
    if missing:
        return f"missing host packages: {' '.join(sorted(missing))} (.ci/run installs them)"
    return None


def _static(path: Path) -> bool:
    """Whether an x86-64 ELF executable has no program interpreter (a static build): the
    initramfs has no libc, and ``busybox`` (not ``busybox-static``) would fail there as init."""
    data = path.read_bytes()[:65536]
    if data[:5] != b"\x7fELF\x02":
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    size, count = int.from_bytes(data[0x36:0x38], "little"), int.from_bytes(data[0x38:0x3A], "little")
    types = [int.from_bytes(data[phoff + i * size : phoff + i * size + 4], "little") for i in range(count)]
    return 3 not in types  # PT_INTERP


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:12]


def _publish(built: Path, final: Path) -> Path:
    """Move a finished build into the cache in one step; another process's equal build wins."""
    try:
        built.rename(final)
    except OSError:
        if not final.exists():
            raise
    return final


class Images(NamedTuple):
    kernel: Path
    """``vmlinuz``; the modules the initramfs needs are in ``modules/`` beside it."""
    initrd: Path
    root: Path


def prepare() -> Images:
    """The kernel, the initramfs and the root image, each from the cache or built now."""
    kernel = fetch_kernel()
    return Images(kernel, initramfs(kernel), root_image())


def fetch_kernel() -> Path:
    """``CACHE/kernel-VERSION/vmlinuz`` (and the modules of :data:`MODULES`) of the kernel
    package :data:`KERNEL_PACKAGE` points at, downloaded and unpacked if none is cached."""
    for cached in sorted(CACHE.glob("kernel-*/vmlinuz"), reverse=True):
        if all((cached.parent / "modules" / f"{m.rsplit('/', 1)[1]}.ko").exists() for m in MODULES):
            return cached
        shutil.rmtree(cached.parent)  # unpacked for a shorter MODULES
    depends = subprocess.run(["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True, text=True)
    package = next(
        (
            line.split()[1]
            for line in depends.stdout.splitlines()
            if line.strip().startswith("Depends: linux-image-") and line.split()[1][12:13].isdigit()
        ),
        None,
    )
    if package is None:
        raise RuntimeError(
            f"apt does not know {KERNEL_PACKAGE} (run apt-get update; apt-cache said: "
            f"{depends.stderr.strip() or depends.stdout.strip()})"
        )
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".kernel-") as tmp:
        work = Path(tmp)
        got = subprocess.run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
            cwd=work,
            capture_output=True,
            text=True,
        )
        debs = list(work.glob("*.deb"))
        if got.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download {package} failed: {got.stderr.strip()[-2000:]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(work / "x")], check=True)
        (version,) = [d.name for d in (work / "x/lib/modules").iterdir()]
        out = work / "kernel"
        (out / "modules").mkdir(parents=True)
        shutil.copy(work / f"x/boot/vmlinuz-{version}", out / "vmlinuz")
        for module in MODULES:
            shutil.copy(work / f"x/lib/modules/{version}/kernel/{module}.ko", out / "modules")
        return _publish(out, CACHE / f"kernel-{version}") / "vmlinuz"


def initramfs(kernel: Path) -> Path:
    """``CACHE/initrd-HASH.gz``: busybox, the modules, :data:`INIT`, as a gzipped newc cpio.
    Older initramfs images are removed when a new one is built."""
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    final = CACHE / f"initrd-{_digest(INIT, kernel.parent.name, busybox.read_bytes())}.gz"
    if final.exists():
        return final
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".initrd-") as tmp:
        tree = Path(tmp) / "tree"
        for d in ("bin", "proc", "sys", "dev", "newroot", "mods"):
            (tree / d).mkdir(parents=True)
        shutil.copy(busybox, tree / "bin/busybox")
        for ko in (kernel.parent / "modules").iterdir():
            shutil.copy(ko, tree / "mods")
        (tree / "init").write_text(INIT)
        (tree / "init").chmod(0o755)
        out = Path(tmp) / "initrd.gz"
        subprocess.run(
            f"find . | cpio -o -H newc --quiet | gzip -1 > {out}", shell=True, cwd=tree, check=True
        )
        _publish(out, final)
    _prune("initrd-*.gz", final)
    return final


def root_image() -> Path:
    """``CACHE/root-HASH.img``: the nspawn test's rootfs (its cache, or debootstrap) with the
    agent, as an ext4 image. Older root images are removed when a new one is built."""
    agent = (ROOT / "tests" / "vm_agent.py").read_bytes()
    key = _digest(agent, AGENT_UNIT, " ".join(MASKED), HOSTNAME, IMAGE_SIZE, str(IMAGE_RECIPE))
    final = CACHE / f"root-{key}.img"
    if final.exists():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".root-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        nspawn.build_rootfs(rootfs, Path(tmp) / "debootstrap.log")
        _customize(rootfs, agent)
        out = Path(tmp) / "root.img"
        made = subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-L", "fw-root", "-d", str(rootfs), str(out), IMAGE_SIZE],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            raise RuntimeError(f"mkfs.ext4 -d {rootfs} failed: {made.stderr.strip()}")
        _publish(out, final)
    _prune("root-*.img", final)
    return final


def _prune(pattern: str, keep: Path) -> None:
    """Remove the cache's older builds of one kind (a qemu still reading one keeps its copy)."""
    for old in CACHE.glob(pattern):
        if old != keep:
            old.unlink(missing_ok=True)


def _customize(root: Path, agent: bytes) -> None:
    """What the VM needs that the nspawn container does not: the agent, started at boot; no
    unit that waits for a device only udev would announce; no timer that works mid-test."""
    (root / "etc/hostname").write_text(f"{HOSTNAME}\n")
    with (root / "etc/hosts").open("a") as hosts:
        hosts.write(f"127.0.1.1\t{HOSTNAME}\n")
    (root / "opt/payload").mkdir(parents=True, exist_ok=True)
    target = root / AGENT_PATH.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(agent)
    units = root / "etc/systemd/system"
    (units / "flow-worker-vm-agent.service").write_text(AGENT_UNIT)
    (units / "sysinit.target.wants").mkdir(parents=True, exist_ok=True)
    (units / "sysinit.target.wants/flow-worker-vm-agent.service").symlink_to(
        "/etc/systemd/system/flow-worker-vm-agent.service"
    )
    for unit in MASKED:
        for wants in units.glob(f"*.wants/{unit}"):
            wants.unlink()
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")


def payload_image(payload: Path, image: Path) -> Path:
    """``payload`` (a directory) as a small ext4 image, mounted read-only at ``/opt/payload``."""
    files = [p for p in payload.rglob("*")]
    kib = int(sum(p.stat().st_size + 4096 for p in files if p.is_file()) * 1.2 / 1024) + 16384
    made = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "fw-payload", "-d", str(payload), str(image), f"{kib}k"],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        raise RuntimeError(f"mkfs.ext4 -d {payload} failed: {made.stderr.strip()}")
    return image


_ACCEL: str | None = None


def accelerator(kernel: Path) -> str:
    """``kvm`` if a kernel really boots under KVM here, else ``tcg``; decided once per process
    (``FLOW_WORKER_VM_ACCEL`` decides instead). Measured on these machines: ``/dev/kvm`` is
    there, but qemu either aborts at once ("failed to set MSR") or exits after 4-5 s having
    printed nothing; so the probe asks for proof: the kernel runs to its "no root" panic."""
    global _ACCEL
    forced = os.environ.get("FLOW_WORKER_VM_ACCEL")
    if forced:
        return forced
    if _ACCEL is None:
        _ACCEL = "tcg"
        if os.access("/dev/kvm", os.R_OK | os.W_OK):
            args = ["-accel", "kvm", "-m", "128", "-serial", "stdio"]
            args += ["-kernel", str(kernel), "-append", "console=ttyS0 panic=-1"]
            if b"Kernel panic" in _output_until(_qemu(args), b"Kernel panic", PROBE_TIMEOUT):
                _ACCEL = "kvm"
    return _ACCEL


def _qemu(args: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """qemu with no default devices and no display, dying with the test process."""
    base = ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-no-reboot", "-cpu", "max"]
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.STDOUT)
    return subprocess.Popen([*base, *args], stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, **popen)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent (thread) dies, so a test process
    killed outright (no ``finally``) does not leave a VM running."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _output_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    """The process's output until ``marker``, its exit or the deadline; then it is ended and reaped."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while marker not in seen and (left := deadline - time.monotonic()) > 0:
            if sel.select(left):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk
    _end(proc, 0)
    proc.stdout.close()
    return seen


def _end(proc: subprocess.Popen[bytes], patience: float) -> int:
    """Wait up to ``patience`` s for the process to exit, then SIGTERM (qemu: stop now), then
    SIGKILL; always reaped. Its exit status."""
    for sig, wait in ((None, patience), (signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        if sig is not None and proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


class Channel:
    """The host's end of the command channel: JSON lines on a Unix stream socket that qemu
    connects to at start (its ``virtserialport`` chardev), the agent at the other end.

    Why a virtio-serial port, not a console or a forwarded TCP port: it works before and
    without the guest's network (a test may cut that), it takes no host TCP port (no race for
    a free port, nothing another local user can reach), bytes pass unaltered (no tty line
    discipline to set raw), and qemu connects before the guest runs, so nothing the agent says
    can be lost. Requests carry ids and the agent answers each from its own thread, so one
    channel serves concurrent callers (a sampler thread beside a long ``systemctl stop``)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.hello: Future[dict[str, Any]] = Future()
        self.closed = False
        self._ids = iter(range(1, 1 << 62))
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="vm-agent-channel", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            with self.conn.makefile("rb") as lines:
                for line in lines:
                    try:
                        message = json.loads(line)
                    except ValueError:
                        continue
                    if "hello" in message:
                        if not self.hello.done():
                            self.hello.set_result(message["hello"])
                        continue
                    with self._lock:
                        waiter = self._pending.pop(message.get("id"), None)
                    if waiter is not None:
                        waiter.set_result(message)
        except OSError:
            pass
        finally:
            lost = ConnectionError("the VM's command channel closed (the VM powered off or died)")
            with self._lock:
                self.closed = True
                waiters, self._pending = list(self._pending.values()), {}
            for waiter in [*waiters, self.hello]:
                if not waiter.done():
                    waiter.set_exception(lost)

    def call(
        self, argv: Sequence[str], timeout: float, stdin: str | None, env: Mapping[str, str]
    ) -> dict[str, Any]:
        """The agent's answer: ``rc`` (None if the command could not run or timed out, then
        ``error``), ``stdout``, ``stderr``. TimeoutError if no answer comes in time."""
        waiter: Future[dict[str, Any]] = Future()
        with self._lock:
            if self.closed:
                raise ConnectionError("the VM's command channel is closed")
            ident = next(self._ids)
            self._pending[ident] = waiter
        request = {"id": ident, "argv": list(argv), "timeout": timeout, "input": stdin, "env": dict(env)}
        with self._send_lock:
            self.conn.sendall(json.dumps(request).encode() + b"\n")
        try:
            return waiter.result(timeout + ANSWER_GRACE)
        except TimeoutError:
            with self._lock:
                self._pending.pop(ident, None)
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self._reader.join(10)


class Vm:
    """One VM: :meth:`boot`, :meth:`run` / :meth:`sh` in the guest, :meth:`shutdown`.

    ``forwards`` maps a guest port (at :data:`FORWARD_IP`) to a port on the host's loopback;
    ``payload`` is a directory the guest sees read-only at ``/opt/payload``. Also a context
    manager (boot on entry, shut down on exit). ``timings`` says how long each step took."""

    def __init__(
        self,
        work: Path,
        *,
        forwards: Mapping[int, int] | None = None,
        payload: Path | None = None,
        memory_mb: int = MEMORY_MB,
        cpus: int = CPUS,
    ) -> None:
        self.work = work
        self.forwards = dict(forwards or {})
        self.payload = payload
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.console = work / "console.log"
        self.qemu_log = work / "qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Channel | None = None
        self.accel = ""
        self.state = ""
        """What ``systemctl is-system-running`` said once booted: running or degraded."""
        self.failed_units = ""
        self.timings: dict[str, float] = {}

    def url(self, guest_port: int, path: str = "") -> str:
        """How the guest reaches a forwarded port, e.g. ``vm.url(4200, "/api")``."""
        return f"http://{FORWARD_IP}:{guest_port}{path}"

    def __enter__(self) -> Vm:
        self.boot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def boot(self) -> None:
        """Prepare the images, start qemu, wait for the agent and for systemd to finish
        booting. On failure the VM is shut down and the error shows the console's tail."""
        try:
            self._boot()
        except BaseException:
            self.shutdown()
            raise

    def _boot(self) -> None:
        t0 = time.monotonic()
        images = prepare()
        self.timings["prepare"] = time.monotonic() - t0
        drives = ["-drive", f"file={images.root},format=raw,if=virtio,snapshot=on"]
        append = "root=/dev/vda console=ttyS0 panic=-1 systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all"
        if self.payload is not None:
            image = payload_image(self.payload, self.work / "payload.img")
            drives += ["-drive", f"file={image},format=raw,if=virtio,readonly=on"]
            append += " fw.payload=1"
        self.accel = accelerator(images.kernel)
        netdev = "user,id=n0,restrict=on,net=10.0.2.0/24"
        for guest, host in sorted(self.forwards.items()):
            netdev += f",guestfwd=tcp:{FORWARD_IP}:{guest}-cmd:socat - TCP:127.0.0.1:{host}"
        sock = self.work / "agent.sock"
        t0 = time.monotonic()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(sock))
            listener.listen(1)
            args = [
                *("-accel", self.accel, "-m", str(self.memory_mb), "-smp", str(self.cpus)),
                *("-kernel", str(images.kernel), "-initrd", str(images.initrd), "-append", append),
                *drives,
                *("-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"),
                *("-chardev", f"socket,id=agent,path={sock}", "-device", "virtio-serial-pci,id=vs0"),
                *("-device", f"virtserialport,bus=vs0.0,chardev=agent,name={AGENT_PORT}"),
                *("-chardev", f"file,id=con,path={self.console}", "-serial", "chardev:con"),
            ]
            with self.qemu_log.open("wb") as log:  # the snapshot's scratch file goes to TMPDIR
                self.proc = _qemu(args, stdout=log, env={**os.environ, "TMPDIR": str(self.work)})
            self.channel = Channel(self._accept(listener))
        hello = self._wait(self.channel.hello, BOOT_TIMEOUT, "the guest's agent to start")
        self.timings["agent"] = time.monotonic() - t0
        left = max(10.0, BOOT_TIMEOUT - (time.monotonic() - t0))
        self.state = self.run(
            "systemctl", "is-system-running", "--wait", check=False, timeout=left
        ).stdout.strip()
        self.timings["boot"] = time.monotonic() - t0
        if self.state != "running":
            self.failed_units = self.run("systemctl", "--failed", "--no-pager", check=False).stdout
        if self.state not in ("running", "degraded"):
            raise RuntimeError(
                f"the VM did not finish booting: systemd is {self.state!r} (agent up at "
                f"{hello.get('uptime')} s of uptime)\n{self.failed_units}\n{self.diagnostics()}"
            )

    def _accept(self, listener: socket.socket) -> socket.socket:
        """qemu's connection to the agent socket, made before the guest runs."""
        listener.settimeout(0.2)
        deadline = time.monotonic() + 30
        while True:
            try:
                conn, _ = listener.accept()
                conn.settimeout(None)
                return conn
            except TimeoutError:
                self._alive("qemu to connect to the agent socket")
                if time.monotonic() > deadline:
                    said = self.diagnostics()
                    raise RuntimeError(f"qemu did not connect to {listener.getsockname()}\n{said}") from None

    def _wait(self, future: Future[dict[str, Any]], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return future.result(1.0)
            except TimeoutError:
                self._alive(what)
                if time.monotonic() > deadline:
                    said = self.diagnostics()
                    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{said}") from None
            except ConnectionError as exc:
                raise RuntimeError(f"{exc}, waiting for {what}\n{self.diagnostics()}") from None

    def _alive(self, what: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"qemu exited ({self.proc.returncode}) waiting for {what}\n{self.diagnostics()}"
            )

    def diagnostics(self, chars: int = 4000) -> str:
        """The tails of qemu's own output and of the guest's console (kernel, initramfs, systemd)."""
        said = []
        for name, path in (("qemu", self.qemu_log), ("console", self.console)):
            text = path.read_text(errors="replace").replace("\r", "") if path.exists() else ""
            said.append(f"--- {name} ({path}), last {chars} characters:\n{text[-chars:]}")
        return "\n".join(said)

    def run(
        self,
        *cmd: str,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``cmd`` run in the guest as root, like ``subprocess.run(cmd, capture_output=True,
        text=True)``: CalledProcessError (with the stderr as a note) if ``check`` and it
        fails, TimeoutExpired after ``timeout`` (its session is killed in the guest)."""
        if self.channel is None:
            raise RuntimeError("the VM is not booted")
        try:
            answer = self.channel.call(cmd, timeout, input, env or {})
        except TimeoutError:
            raise subprocess.TimeoutExpired(list(cmd), timeout) from None
        if answer.get("rc") is None:
            error = str(answer.get("error", ""))
            if error.startswith("timed out"):
                raise subprocess.TimeoutExpired(
                    list(cmd), timeout, answer.get("stdout"), answer.get("stderr")
                )
            raise OSError(f"in the VM, {list(cmd)} could not run: {error}")
        done = subprocess.CompletedProcess(list(cmd), int(answer["rc"]), answer["stdout"], answer["stderr"])
        if check and done.returncode != 0:
            exc = subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
            exc.add_note(f"in the VM; its stderr: {done.stderr.strip()[-2000:]}")
            raise exc
        return done

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> str:
        """``sh -c script`` in the guest; its stdout."""
        return self.run("sh", "-c", script, check=check, timeout=timeout).stdout

    def shutdown(self, timeout: float = POWEROFF_TIMEOUT) -> None:
        """``systemctl poweroff`` and wait for qemu to exit; after ``timeout``, terminate it,
        then kill it. qemu is always reaped. Idempotent."""
        t0 = time.monotonic()
        proc, channel = self.proc, self.channel
        if proc is not None:
            patience = 0.0
            if proc.poll() is None and channel is not None and not channel.closed:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    self.run("systemctl", "poweroff", "--no-block", timeout=15, check=False)
                    patience = timeout
            _end(proc, patience)
            self.timings["poweroff"] = time.monotonic() - t0
        if channel is not None:
            channel.close()
        self.channel = None


def build_deb(dest: Path) -> Path:
    """The ``.deb`` built from this checkout (``packaging/build-deb``), copied to ``dest``."""
    built = subprocess.run(
        [str(ROOT / "packaging" / "build-deb")], capture_output=True, text=True, check=True
    )
    return Path(shutil.copy(built.stdout.strip().splitlines()[-1], dest))
