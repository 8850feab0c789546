"""Talking to systemd without libsystemd: sd_notify(3) and the journald native protocol.

* :class:`Notifier` sends ``READY=1``, ``STATUS=``, ``WATCHDOG=1``, ``STOPPING=1`` and
  ``EXTEND_TIMEOUT_USEC=`` datagrams to ``$NOTIFY_SOCKET``. Without that variable every
  call is a no-op, so the worker behaves the same outside systemd. When to send
  ``WATCHDOG=1`` is decided in ``liveness.py``.
* :class:`JournalSender` writes one entry per datagram to ``/run/systemd/journal/socket``
  (see systemd's "Native Journal Protocol"): ``KEY=value`` lines, or, for a value with a
  newline, ``KEY``, a newline, its length as 64-bit little endian, the bytes, a newline.
* :func:`journal_stream_is_stderr` tells whether stderr is connected to the journal
  (``$JOURNAL_STREAM`` names stderr's device and inode), i.e. whether to use it.

Send errors are swallowed: logging or notifying must never take the worker down.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from collections.abc import Mapping
from typing import Any, Final

JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"
_FIELD_OK: Final = re.compile(r"[^A-Z0-9_]")


def _address(raw: str) -> str:
    return "\0" + raw[1:] if raw.startswith("@") else raw


class Notifier:
    """sd_notify for the main process; ``enabled`` is False outside a notify unit."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _address(raw) if raw else None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_for_us = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_seconds: float | None = int(usec) / 1e6 if watchdog_for_us else None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: Any) -> bool:
        if self.address is None:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self) -> None:
        if self.watchdog_seconds is not None:
            self.send(WATCHDOG="1")

    def alive(self, status: str) -> None:
        """``STATUS=``, with ``WATCHDOG=1`` if there is a watchdog (one datagram):
        what ``liveness.Liveness.watch`` says each tick the worker is judged alive."""
        if self.watchdog_seconds is not None:
            self.send(WATCHDOG="1", STATUS=status)
        else:
            self.send(STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=status)

    def extend_timeout(self, seconds: float, status: str) -> None:
        self.send(EXTEND_TIMEOUT_USEC=str(int(seconds * 1e6)), STATUS=status)


def journal_stream_is_stderr(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    env = os.environ if environ is None else environ
    stream = env.get("JOURNAL_STREAM", "")
    if ":" not in stream:
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def field_name(key: str) -> str:
    """A journal field name: upper case letters, digits and underscores, not leading ``_``."""
    name = _FIELD_OK.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    return name[:64]


def encode(fields: Mapping[str, Any]) -> bytes:
    out = bytearray()
    for key, value in fields.items():
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        name = key.encode()
        if b"\n" in data:
            out += name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name + b"=" + data + b"\n"
    return bytes(out)


class JournalSender:
    MAX_VALUE: Final = 48 * 1024
    """Values are cut to this many bytes so one entry always fits in a datagram."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self._sock: socket.socket | None = None

    def send(self, fields: Mapping[str, Any]) -> bool:
        cut = {k: (v[: self.MAX_VALUE] if isinstance(v, str | bytes) else v) for k, v in fields.items()}
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(encode(cut), self.path)
        except OSError:
            return False
        return True
