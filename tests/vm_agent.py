"""The guest's end of the VM harness's command channel (``tests/vm.py``), run by the guest's systemd.

Copied into the VM's root image as ``/usr/local/lib/flow-worker-vm/agent.py`` (Debian's python3,
standard library only). It opens the virtio-serial port named ``fw.agent``, says hello (the boot
id), then reads one JSON request per line and runs each in its own thread, so a long command
(``systemctl stop`` of a draining worker) does not hold up a short one beside it:

    -> {"id": 7, "argv": ["systemctl", "is-active", "x"], "timeout": 60, "input": null, "env": {}}
    <- {"id": 7, "rc": 3, "stdout": "inactive\\n", "stderr": ""}

A command runs in a new session; at its timeout the whole session is SIGKILLed and the answer
has ``"rc": null`` and an ``"error"``. Output is UTF-8 (undecodable bytes replaced).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PORT_NAME = "fw.agent"
FIND_PORT_SECONDS = 60.0
"""How long to look for the port after start: the virtio_console module is loaded by the
initramfs, so the port is there from the start; a minute leaves room for a slow boot."""


def find_port() -> str:
    """``/dev/vportNpM`` of the port named PORT_NAME, from sysfs (the image has no udev, so
    there is no ``/dev/virtio-ports/NAME`` link; devtmpfs makes the node itself)."""
    deadline = time.monotonic() + FIND_PORT_SECONDS
    while True:
        for entry in Path("/sys/class/virtio-ports").glob("*"):
            try:
                if (entry / "name").read_text().strip() == PORT_NAME:
                    return f"/dev/{entry.name}"
            except OSError:
                continue
        if time.monotonic() > deadline:
            sys.exit(f"no virtio-serial port named {PORT_NAME} after {FIND_PORT_SECONDS:.0f}s")
        time.sleep(0.1)


class Channel:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        with self.lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]

    def lines(self) -> Iterator[bytes]:
        with os.fdopen(os.dup(self.fd), "rb") as reader:
            yield from reader


def run(channel: Channel, request: dict[str, Any]) -> None:
    answer: dict[str, Any] = {"id": request.get("id")}
    try:
        text = request.get("input")
        proc = subprocess.Popen(
            request["argv"],
            stdin=subprocess.PIPE if text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **request.get("env", {})},
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(text.encode() if text is not None else None, request["timeout"])
            answer["rc"] = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            answer.update(rc=None, error=f"timed out after {request['timeout']}s")
        answer["stdout"] = out.decode(errors="replace")
        answer["stderr"] = err.decode(errors="replace")
    except Exception as exc:  # the host is told; the agent goes on
        answer.update(rc=None, error=f"{type(exc).__name__}: {exc}")
    channel.send(answer)


def main() -> None:
    channel = Channel(find_port())
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    channel.send(
        {"hello": {"boot_id": boot_id, "uptime": float(Path("/proc/uptime").read_text().split()[0])}}
    )
    for line in channel.lines():
        try:
            request = json.loads(line)
        except ValueError:
            continue  # noise before the host's first line (none expected)
        threading.Thread(target=run, args=(channel, request), daemon=True).start()
    sys.exit("the host closed the channel")  # systemd starts the agent again (Restart=always)


if __name__ == "__main__":
    main()
