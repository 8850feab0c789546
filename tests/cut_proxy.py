"""A loopback TCP proxy that can be cut: a host's network partition, for the fence test.

While cut it stops answering: bytes already in flight are not relayed, new connections
are accepted and then left hanging (the client's requests time out, as on a dead
route). ``heal()`` drops every connection that lived through the cut (the client sees
them closed and reconnects) and relays again.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time

REQUEST_LINE = re.compile(rb"(?:GET|POST|PATCH|PUT|DELETE) (/api/[^ ]*) HTTP/1\.[01]\r\n")


class CutProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.is_cut = False
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._held: list[socket.socket] = []
        self._stop = False
        self.requests: list[tuple[float, str]] = []
        """(time.monotonic(), path) of each HTTP request relayed to the server."""

    def __enter__(self) -> CutProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self.listener.close()
        self._drop_all()

    def cut(self) -> None:
        with self._lock:
            self.is_cut = True

    def count(self, since: float) -> int:
        """Requests relayed since ``since`` (``time.monotonic()``), a websocket's upgrade included."""
        with self._lock:
            return sum(1 for t, _ in self.requests if t >= since)

    def heal(self) -> None:
        self._drop_all()
        with self._lock:
            self.is_cut = False

    def _drop_all(self) -> None:
        with self._lock:
            doomed, self._open, self._held = self._open + self._held, [], []
        for s in doomed:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self.is_cut:
                    self._held.append(client)  # accepted, never answered
                    continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._open += [client, upstream]
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 0.1)
                if self.is_cut:
                    time.sleep(0.1)  # leave the bytes where they are: nothing answers
                    continue
                for src in readable:
                    data = src.recv(65536)
                    if not data:
                        return
                    if src is a:
                        found = [m.group(1).decode() for m in REQUEST_LINE.finditer(data)]
                        with self._lock:
                            self.requests += [(time.monotonic(), path) for path in found]
                    peer[src].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass
