"""Peer discovery and progress tracking: each peer's heartbeat in the DHT.

Every peer stores a small record under ``<run prefix>_progress`` (subkey: its peer id) every
``heartbeat_period`` seconds, expiring after ``heartbeat_ttl``. Reading the key gives the live
swarm: who is training, who is ready to average which round, how fast each one is. A peer that
stops heartbeating (crash, SIGKILL, lost network) drops out of the view within ``heartbeat_ttl``.
Malformed records are ignored, never trusted.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import msgpack

from swarmloco.protocol.transport import Transport

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATES = ("joining", "training", "ready", "averaging", "idle", "stopped")


@dataclass(frozen=True)
class PeerProgress:
    """One peer's heartbeat."""

    peer_id: str
    outer_step: int
    state: str
    time: float
    samples: int = 0
    """Samples processed since this peer's last outer step."""
    samples_per_second: float = 0.0
    maddrs: tuple[str, ...] = ()
    round_time: float | None = None
    bytes_per_round: int | None = None
    digest: str = ""
    """First 16 hex digits of sha256 of the peer's global params at ``outer_step`` (equal across replicas)."""
    attempt: int = 0
    """Which try of the round for ``outer_step`` this peer is in (a failed round is re-run among survivors)."""
    extra: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["maddrs"] = list(self.maddrs)
        return msgpack.packb({"v": SCHEMA_VERSION, **data}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, raw: bytes) -> PeerProgress | None:
        try:
            obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_str_len=1 << 14, max_array_len=64,
                                  max_map_len=64, max_bin_len=1 << 14)
            if not isinstance(obj, dict) or obj.pop("v", None) != SCHEMA_VERSION:
                return None
            rec = cls(
                peer_id=str(obj["peer_id"]),
                outer_step=int(obj["outer_step"]),
                state=str(obj["state"]),
                time=float(obj["time"]),
                samples=int(obj.get("samples", 0)),
                samples_per_second=float(obj.get("samples_per_second", 0.0)),
                maddrs=tuple(str(m) for m in obj.get("maddrs", ())),
                round_time=None if obj.get("round_time") is None else float(obj["round_time"]),
                bytes_per_round=None if obj.get("bytes_per_round") is None else int(obj["bytes_per_round"]),
                digest=str(obj.get("digest", ""))[:64],
                attempt=int(obj.get("attempt", 0)),
                extra=dict(obj.get("extra") or {}),
            )
        except Exception:  # noqa: BLE001 - hostile or stale-schema bytes are ignored
            return None
        if rec.state not in STATES or rec.outer_step < 0 or rec.attempt < 0 or not math.isfinite(rec.time):
            return None
        return rec

    def to_dict(self) -> dict:
        data = asdict(self)
        data["maddrs"] = list(self.maddrs)
        return data


class ProgressTracker:
    """Publishes this peer's heartbeat and reads everyone's."""

    def __init__(self, transport: Transport, key: str, ttl: float, clock: Callable[[], float] = time.time):
        self.transport, self.key, self.ttl, self.clock = transport, key, ttl, clock

    def publish(self, progress: PeerProgress) -> bool:
        return self.transport.store(self.key, progress.peer_id, progress.to_bytes(), self.clock() + self.ttl)

    def fetch(self) -> list[PeerProgress]:
        """Live peers (heartbeat younger than ttl), one record each, sorted by peer id."""
        now = self.clock()
        out = []
        for subkey, raw in self.transport.get(self.key).items():
            rec = PeerProgress.from_bytes(raw)
            if rec is None or rec.peer_id != subkey:
                logger.debug("ignoring malformed progress record under subkey %s", subkey)
                continue
            if now - rec.time <= self.ttl and rec.state != "stopped":
                out.append(rec)
        return sorted(out, key=lambda r: r.peer_id)


class SwarmWatcher:
    """Everyone's heartbeats for a run, whatever manifests its peers use (for the monitor)."""

    def __init__(self, transport: Transport, run_id: str, ttl: float = 10.0, clock: Callable[[], float] = time.time):
        from swarmloco.protocol.manifest import run_key

        self.transport, self.ttl, self.clock = transport, ttl, clock
        self.run_key = run_key(run_id)

    def fetch(self) -> list[dict]:
        from swarmloco.protocol.manifest import manifest_from_bytes

        manifests = {m.hash: m for m in map(manifest_from_bytes, self.transport.get(self.run_key).values()) if m}
        peers: list[dict] = []
        for manifest in manifests.values():
            tracker = ProgressTracker(self.transport, f"{manifest.key_prefix}_progress", self.ttl, self.clock)
            for rec in tracker.fetch():
                peers.append({**rec.to_dict(), "manifest": manifest.short})
        return peers
