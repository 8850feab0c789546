"""A loopback TLS terminator: HTTPS (and WSS) in front of a plain-HTTP server, bytes piped
both ways, so REST calls and the events websocket both cross it. The certificate is
issued for 127.0.0.1 by a throwaway CA (trustme), whose PEM the tests hand to the worker."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import trustme


class TlsProxy:
    def __init__(self, upstream_port: int, ca_pem: Path) -> None:
        self.ca = trustme.CA()
        self.ca.cert_pem.write_to_path(str(ca_pem))
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(self.context)
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.handshakes_failed = 0
        self._stop = False

    def __enter__(self) -> TlsProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshakes_failed += 1  # e.g. the worker did not trust our CA
            raw.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
