"""The node's live status: one dict (schema 1) read by the status endpoint, the TUI and the demo.

The peer writes through :class:`StatusBoard`; readers take :meth:`StatusBoard.snapshot`. Event
sinks (the demo's JSON lines, the UI's event log) are reporters; :class:`NullReporter` when none.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from typing import Any, Protocol


class Reporter(Protocol):
    def round_done(self, summary: dict[str, Any]) -> None: ...

    def event(self, kind: str, message: str) -> None: ...


class NullReporter:
    def round_done(self, summary: dict[str, Any]) -> None:
        pass

    def event(self, kind: str, message: str) -> None:
        pass


class JsonLinesReporter:
    """Machine-readable lines on stdout (``@@swarmloco {json}``), read by ``swarmloco demo``."""

    PREFIX = "@@swarmloco "

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()

    def _emit(self, obj: dict[str, Any]) -> None:
        with self.lock:
            try:
                self.stream.write(self.PREFIX + json.dumps(obj) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # the reader went away (closed pipe or terminal): training goes on
                pass

    def round_done(self, summary: dict[str, Any]) -> None:
        self._emit({"type": "round", **summary})

    def event(self, kind: str, message: str) -> None:
        self._emit({"type": "event", "kind": kind, "message": message})


class TeeReporter:
    """Several reporters as one (e.g. ``--json-events`` lines and the console's step lines)."""

    def __init__(self, *reporters: Reporter):
        self.reporters = reporters

    def round_done(self, summary: dict[str, Any]) -> None:
        for r in self.reporters:
            r.round_done(summary)

    def event(self, kind: str, message: str) -> None:
        for r in self.reporters:
            r.event(kind, message)


class StatusBoard:
    """Thread-safe status dict plus bounded history and event log."""

    def __init__(self, reporter: Reporter | None = None, history: int = 500, events: int = 200):
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {"schema": 1, "state": "joining", "bytes_sent_total": 0,
                                        "bytes_received_total": 0, "rounds_ok": 0, "rounds_failed": 0}
        self._history: deque[dict[str, Any]] = deque(maxlen=history)
        self._events: deque[dict[str, Any]] = deque(maxlen=events)
        self.reporter = reporter or NullReporter()

    def update(self, **fields: Any) -> None:
        with self._lock:
            self._status.update(fields)

    def add(self, **increments: float) -> None:
        with self._lock:
            for key, value in increments.items():
                self._status[key] = self._status.get(key, 0) + value

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._status.get(key, default)

    def event(self, kind: str, message: str) -> None:
        with self._lock:
            self._events.append({"time": time.time(), "kind": kind, "message": message})
        self.reporter.event(kind, message)

    def round_done(self, summary: dict[str, Any]) -> None:
        with self._lock:
            self._history.append({k: summary.get(k) for k in (
                "outer_step", "train_loss", "eval_loss", "round_time", "peers", "bytes_sent", "bytes_received")})
        self.reporter.round_done(summary)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = dict(self._status)
            out["history"] = list(self._history)
            out["events"] = list(self._events)
            return out
