"""Where the monitor gets its data: a node's local status endpoint, and a view of the swarm.

Every source has one blocking method, ``fetch()``, called from a worker thread. A source that
cannot answer raises ``Unreachable``; the monitor then keeps the last data on screen.

Recordings (for tests and ``swarmloco monitor --replay``) are JSON (a list of frames) or JSONL
(one frame a line). A frame is whatever the source returns, or a dict holding it under a key,
e.g. ``{"recorded_at": 1764000000.0, "status": {...}, "peers": [...]}``.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)


class Unreachable(Exception):
    """The source could not be read this time (node down, timeout, garbage answer)."""


class NodeSource:
    """Reads ``http://127.0.0.1:PORT/status`` of a running node."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> None:
        self.port = port
        self.host = host
        self.timeout = timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/status"

    def describe(self) -> str:
        return f"{self.host}:{self.port}"

    def fetch(self) -> dict:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, bad JSON
            logger.debug("node status %s unreachable: %r", self.url, exc)
            raise Unreachable(f"{self.describe()}: {exc}") from exc
        if not isinstance(payload, dict):
            raise Unreachable(f"{self.describe()}: status is not a JSON object")
        return payload


@runtime_checkable
class SwarmSource(Protocol):
    """Anything that lists the swarm's peer heartbeat records."""

    def fetch(self) -> list[dict]: ...


def load_recording(path: str | Path) -> list[Any]:
    """Frames of a JSON (list) or JSONL (one frame a line) recording."""
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        frames = json.loads(stripped)
        if not isinstance(frames, list):
            raise ValueError(f"{path}: expected a JSON list of frames")
        return frames
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class RecordedSource:
    """Replays recorded frames, one per ``fetch()``; stays on the last one (or loops).

    ``key`` picks one part of each frame (``"status"`` for a node view, ``"peers"`` for the swarm
    view). With ``clock`` given, frames that carry ``recorded_at`` have their heartbeat and event
    times shifted to look fresh, so a replayed swarm does not show every peer as stale.
    A frame without ``key`` (or ``None`` in it) makes that fetch raise ``Unreachable``.
    """

    def __init__(
        self,
        frames: Sequence[Any],
        *,
        key: str | None = None,
        loop: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not frames:
            raise ValueError("a recording needs at least one frame")
        self._frames = list(frames)
        self._key = key
        self._loop = loop
        self._clock = clock
        self._index = 0

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> RecordedSource:
        return cls(load_recording(path), **kwargs)

    def describe(self) -> str:
        n = len(self._frames)
        return f"replay of {n} frame{'' if n == 1 else 's'}"

    def __len__(self) -> int:
        return len(self._frames)

    def fetch(self) -> Any:
        frame = self._frames[self._index]
        if self._index + 1 < len(self._frames):
            self._index += 1
        elif self._loop:
            self._index = 0
        data = frame
        if self._key is not None:
            data = frame.get(self._key) if isinstance(frame, dict) else None
        if data is None:
            raise Unreachable("recorded frame has no data")
        if self._clock is not None and isinstance(frame, dict) and "recorded_at" in frame:
            data = _shift_times(data, self._clock() - float(frame["recorded_at"]))
        return data


def _shift_times(data: Any, delta: float) -> Any:
    """Copy of ``data`` with heartbeat/event ``time`` fields moved by ``delta`` seconds."""
    if isinstance(data, list):
        return [_shift_times(item, delta) for item in data]
    if not isinstance(data, dict):
        return data
    out = dict(data)
    if isinstance(out.get("time"), (int, float)):
        out["time"] = out["time"] + delta
    if isinstance(out.get("events"), list):
        out["events"] = _shift_times(out["events"], delta)
    return out
