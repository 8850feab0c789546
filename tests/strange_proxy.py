"""A loopback reverse proxy that answers strangely (issue 19): a web page for one endpoint
family, or a share of every answer corrupted (truncated JSON, JSON of the wrong type, a web
page), or a Prefect UI at every path outside ``/api``.

A corrupted answer is always the server's real answer spoiled *after* the server acted on
the request (except a family's web page, which is what a proxy in the way would answer):
the worst case, a claim the server wrote whose answer the worker cannot read.
"""

from __future__ import annotations

import collections
import json
import random
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}
PAGE = (
    b"<!doctype html>\n<html lang='en'><head><title>Prefect Server</title></head><body>"
    + b" " * 300
    + b"</html>"
)
UI_INDEX = (
    Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/prefect/server/ui/index.html"
)

FAMILIES: dict[str, Callable[[str, str], bool]] = {
    "work_pools read": lambda m, p: m == "GET" and re.fullmatch(r"/api/work_pools/[^/]+", p) is not None,
    "heartbeat": lambda m, p: p.endswith("/workers/heartbeat"),
    "get_scheduled_flow_runs": lambda m, p: p.endswith("/get_scheduled_flow_runs"),
    "set_state": lambda m, p: p.endswith("/set_state"),
    "flow_runs/filter": lambda m, p: p == "/api/flow_runs/filter",
    "deployments": lambda m, p: p.startswith("/api/deployments/"),
    "labels": lambda m, p: p.endswith("/labels"),
    "logs/events": lambda m, p: p in ("/api/logs/", "/api/events"),
    "flow_run_states": lambda m, p: p.startswith("/api/flow_run_states"),
}


def wrong_type(body: bytes) -> bytes:
    """Valid JSON of another type than the answer's."""
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if isinstance(value, list):
        return b'{"unexpected": [1, 2]}'
    if isinstance(value, dict):
        return b'[{"unexpected": true}, "a string"]'
    return b'"a string"'


class StrangeProxy:
    def __init__(self, upstream: str, seed: int = 19) -> None:
        self.upstream = upstream.rstrip("/")
        self.family: str | None = None
        """Answer a web page (200) to this endpoint family, without asking the server."""
        self.rate = 0.0
        """The share of every other answer corrupted at random."""
        self.ui = False
        """Serve a Prefect UI at every path outside /api (GET: 200 index.html; else 405)."""
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.corrupted: collections.Counter[str] = collections.Counter()
        self.forwarded = 0
        self.client = httpx.Client(timeout=60)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return

            def _answer(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                if proxy.ui and not path.startswith("/api/"):
                    with proxy.lock:
                        proxy.corrupted["ui"] += 1
                    if self.command in ("GET", "HEAD"):
                        page = UI_INDEX.read_bytes() if UI_INDEX.exists() else PAGE
                        self._answer(200, "text/html; charset=utf-8", page)
                    else:
                        self._answer(405, "text/plain; charset=utf-8", b"Method Not Allowed")
                    return
                family = proxy.family
                if family is not None and FAMILIES[family](self.command, path):
                    with proxy.lock:
                        proxy.corrupted[family] += 1
                    self._answer(200, "text/html; charset=utf-8", PAGE)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream = proxy.client.request(
                    self.command, proxy.upstream + self.path, headers=headers, content=body
                )
                status, content = upstream.status_code, upstream.content
                content_type = upstream.headers.get("content-type", "application/json")
                with proxy.lock:
                    kind = None
                    if proxy.rng.random() < proxy.rate:
                        kind = proxy.rng.choice(["truncated", "wrong type", "html"])
                        proxy.corrupted[kind] += 1
                    else:
                        proxy.forwarded += 1
                if kind == "truncated" and content:
                    content = content[: len(content) // 2]
                elif kind == "truncated" or kind == "wrong type":
                    status, content_type, content = (
                        (200 if status == 204 else status),
                        "application/json",
                        wrong_type(content),
                    )
                elif kind == "html":
                    status, content_type, content = 200, "text/html; charset=utf-8", PAGE
                if kind is None:
                    self.send_response(status)
                    for k, v in upstream.headers.items():
                        if k.lower() not in HOP_BY_HOP:
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                else:
                    self._answer(status, content_type, content)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> StrangeProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()
