"""A tiny local HTTP endpoint that exposes a node's status to ``swarmloco monitor`` and Prometheus.

Routes: ``GET /status`` (JSON of the status dict), ``GET /metrics`` (Prometheus text, see
``swarmloco.app.metrics``); anything else is 404. It binds 127.0.0.1 only: the status carries
peer ids and addresses, and nothing here is meant for the open internet. A failing ``get_status``
answers 500 with a one-line JSON error and the server keeps serving.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from swarmloco.app.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from swarmloco.app.metrics import render_metrics

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats by None so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _make_handler(get_status: Callable[[], dict], seen: Callable[[], None]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "swarmloco-status/1"

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            seen()
            path = self.path.split("?", 1)[0]
            if path not in ("/status", "/metrics"):
                self._send(404, "application/json", json.dumps({"error": "not found"}))
                return
            try:
                status = get_status()
                if path == "/status":
                    body = json.dumps(_json_safe(status), default=str, allow_nan=False)
                    ctype = "application/json"
                else:
                    body = render_metrics(status)
                    ctype = METRICS_CONTENT_TYPE
            except Exception as exc:  # the endpoint must survive any bug in get_status
                logger.warning("status endpoint %s failed: %r", path, exc)
                message = f"{type(exc).__name__}: {exc}".replace("\n", " ")
                self._send(500, "application/json", json.dumps({"error": message}))
                return
            self._send(200, ctype, body)

        def _send(self, code: int, ctype: str, body: str) -> None:
            data = body.encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            logger.debug("%s " + format, self.address_string(), *args)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class StatusServer:
    """Serve ``get_status()`` on 127.0.0.1:``port`` (0 picks a free port) from a daemon thread."""

    def __init__(self, get_status: Callable[[], dict], port: int) -> None:
        self._get_status = get_status
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._last_request: float | None = None

    def _seen(self) -> None:
        self._last_request = time.monotonic()

    def last_request(self) -> float | None:
        """``time.monotonic()`` of the last request served (a monitor is reading), or None."""
        return self._last_request

    def start(self) -> None:
        """Bind and serve; OSError if the port is taken (the caller says so in one line)."""
        if self._server is not None:
            raise RuntimeError("StatusServer already started")
        self._server = _Server((HOST, self._requested_port), _make_handler(self._get_status, self._seen))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
            name="swarmloco-status", daemon=True,
        )
        self._thread.start()
        logger.info("status endpoint on http://%s:%d/status", HOST, self.port)

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("StatusServer not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def close(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> StatusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
