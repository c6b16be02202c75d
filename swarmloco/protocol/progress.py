"""Peer discovery and progress tracking: each peer's signed heartbeat in the DHT.

Every peer stores a small signed record (``records.py``, kind ``progress``) under
``<run prefix>_progress`` every ``heartbeat_period`` seconds, expiring after ``heartbeat_ttl``; the
subkey is its public key (hex), so nobody can overwrite another peer's heartbeat (the DHT validator
checks it on every node that stores one, the reader checks it again). Reading the key gives the live
swarm: who is training, who is ready to average which round, how fast each one is. A peer that stops
heartbeating (crash, SIGKILL, lost network) drops out of the view within ``heartbeat_ttl``.

A heartbeat counts only if its signature, key, expiry and schema hold and the ``peer_id`` it claims is
the libp2p id of the key that signed it (so the peer the record names is the one matchmaking and
state download talk to). Anything else is ignored, never trusted.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from swarmloco.protocol.clock import ClockCheck
from swarmloco.protocol.identity import SIGNATURE_SIZE, Identity, peer_id_of_public_key
from swarmloco.protocol.records import RecordError, decode_record, encode_record
from swarmloco.protocol.interface import Transport

logger = logging.getLogger(__name__)

KIND = "progress"
RERUN_CAUSES = ("", "broken", "decided")
STATES = ("joining", "training", "ready", "averaging", "idle", "stopped")
_MAX_STR = 256
MAX_ATTEST = 4
MAX_SUSPECTS = 8


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
    rerun: str = ""
    """Why this peer re-runs the round (``attempt`` > 0): ``"broken"``, its all-reduce failed (group mates may
    still be stuck inside it and should give it up), or ``"decided"``, its group finished the all-reduce and
    decided not to commit (no quorum, mixed states): other groups of the same attempt are unaffected."""
    suspects: tuple[str, ...] = ()
    """With ``rerun="broken"``: the peers whose streams broke in the failed attempt (at most ``MAX_SUSPECTS``).
    A hint for mates that gave that attempt up on seeing this re-run without learning them (they need not
    wait for a dead reducer's heartbeat to go stale), never proof: a live peer named is alive again at its
    next heartbeat."""
    attest: tuple[tuple[int, bytes], ...] = ()
    """(outer step, signature) of this peer's last few committed rounds: its signature of each round's
    header (:mod:`swarmloco.protocol.certificates`), which its group mates add to their certificates."""
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_body(cls, obj: object) -> PeerProgress | None:
        """Parse a heartbeat record's body; None if anything is missing, mistyped or out of range."""
        try:
            if not isinstance(obj, dict):
                return None
            maddrs = obj.get("maddrs", ())
            if not isinstance(maddrs, (list, tuple)) or len(maddrs) > 16:
                return None
            extra = obj.get("extra") or {}
            if not isinstance(extra, dict) or len(extra) > 32:
                return None
            attest = obj.get("attest") or ()
            if not isinstance(attest, (list, tuple)) or len(attest) > MAX_ATTEST or not all(
                    isinstance(a, (list, tuple)) and len(a) == 2 and type(a[0]) is int and a[0] >= 0
                    and isinstance(a[1], bytes) and len(a[1]) == SIGNATURE_SIZE for a in attest):
                return None
            suspects = obj.get("suspects") or ()
            if not isinstance(suspects, (list, tuple)) or len(suspects) > MAX_SUSPECTS \
                    or not all(isinstance(p, str) and len(p) <= _MAX_STR for p in suspects):
                return None
            rec = cls(
                peer_id=str(obj["peer_id"]),
                outer_step=int(obj["outer_step"]),
                state=str(obj["state"]),
                time=float(obj["time"]),
                samples=int(obj.get("samples", 0)),
                samples_per_second=float(obj.get("samples_per_second", 0.0)),
                maddrs=tuple(str(m)[:_MAX_STR] for m in maddrs),
                round_time=None if obj.get("round_time") is None else float(obj["round_time"]),
                bytes_per_round=None if obj.get("bytes_per_round") is None else int(obj["bytes_per_round"]),
                digest=str(obj.get("digest", ""))[:64],
                attempt=int(obj.get("attempt", 0)),
                rerun=str(obj.get("rerun", "")),
                suspects=tuple(suspects),
                attest=tuple((int(a[0]), bytes(a[1])) for a in attest),
                extra=dict(extra),
            )
        except Exception:  # noqa: BLE001 - hostile or stale-schema values are ignored
            return None
        if rec.state not in STATES or rec.rerun not in RERUN_CAUSES or rec.outer_step < 0 or rec.attempt < 0 or not math.isfinite(rec.time) \
                or len(rec.peer_id) > _MAX_STR or not math.isfinite(rec.samples_per_second):
            return None
        return rec

    def to_dict(self) -> dict:
        data = asdict(self)
        data["maddrs"] = list(self.maddrs)
        data["suspects"] = list(self.suspects)
        data["attest"] = [[step, sig] for step, sig in self.attest]
        return data

    def display_dict(self) -> dict:
        """The heartbeat as JSON-able fields for status pages and the monitor (no signatures)."""
        data = self.to_dict()
        del data["attest"]
        return data


def read_progress(raw: bytes, *, key: str, subkey: str, now: float) -> tuple[PeerProgress, bytes]:
    """A signed heartbeat and its author's public key; ``RecordError`` (one-line reason) unless it is a valid
    progress record for ``key``, stored under its author's subkey, naming its author's own peer id."""
    record = decode_record(raw, now=now)
    if record.kind != KIND or record.key != key:
        raise RecordError(f"a {record.kind!r} record bound to another key")
    if subkey != record.author_hex:
        raise RecordError("stored under another author's subkey")
    progress = PeerProgress.from_body(record.body)
    if progress is None:
        raise RecordError("malformed heartbeat body")
    if progress.peer_id != peer_id_of_public_key(record.author):
        raise RecordError("claims a peer id that is not its signer's")
    return progress, record.author


class ProgressTracker:
    """Publishes this peer's signed heartbeat and reads everyone's.

    ``admits(public_key)`` (private runs: holds an access token) filters whose heartbeats count."""

    def __init__(self, transport: Transport, key: str, ttl: float, identity: Identity | None,
                 clock: Callable[[], float] = time.time, admits: Callable[[bytes], bool] | None = None,
                 heartbeat_period: float = 2.0):
        self.transport, self.key, self.ttl, self.identity, self.clock = transport, key, ttl, identity, clock
        self.admits = admits
        self.clock_check = ClockCheck(slack=heartbeat_period)
        """This machine's clock against the senders' of the heartbeats read (``clock.py``)."""
        self._warned: set[tuple[str, str]] = set()
        self._known: dict[str, tuple[PeerProgress, bytes]] = {}  # peer id -> its newest heartbeat read, author

    def publish(self, progress: PeerProgress) -> bool:
        if self.identity is None:
            raise RuntimeError("a read-only tracker (no identity) cannot publish")
        expires = self.clock() + self.ttl
        try:
            raw = encode_record(KIND, progress.to_dict(), self.identity, expires, key=self.key)
        except RecordError as e:  # our own heartbeat does not fit: say so, never crash the heartbeat
            logger.warning("heartbeat not published: %s", e)
            return False
        return self.transport.store(self.key, self.identity.public_hex, raw, expires)

    def fetch(self) -> list[PeerProgress]:
        """Live peers (heartbeat younger than ttl), one record each, sorted by peer id.

        A heartbeat read once counts until it is ``ttl`` old, as it does in the DHT, even when a later read
        misses it: a DHT lookup on a loaded machine or a lossy link can come back short, and a peer that
        took a short read for an empty swarm would commit a round alone while the others live."""
        now = self.clock()
        for subkey, raw in self.transport.get(self.key).items():
            try:
                rec, author = read_progress(raw, key=self.key, subkey=subkey, now=now)
            except RecordError as e:
                self._ignore(subkey, str(e))
                continue
            known = self._known.get(rec.peer_id)
            if known is None or rec.time >= known[0].time:
                if known is not None and rec.time > known[0].time and rec.peer_id != self.transport.peer_id:
                    self.clock_check.observe(rec.peer_id, rec.time, now)  # (sent since the last read: fresh)
                self._known[rec.peer_id] = (rec, author)
        out = []
        for peer_id, (rec, author) in list(self._known.items()):
            if now - rec.time > self.ttl:
                del self._known[peer_id]
                self.clock_check.forget(peer_id)
            elif rec.state != "stopped" and (self.admits is None or self.admits(author)):
                out.append(rec)
        return sorted(out, key=lambda r: r.peer_id)


    def _ignore(self, subkey: str, reason: str) -> None:
        """Log an invalid heartbeat once per (subkey, reason); an expired one is only a peer that left."""
        if reason.startswith("expired") or (subkey, reason) in self._warned:
            return
        if len(self._warned) < 1024:
            self._warned.add((subkey, reason))
        logger.warning("ignoring an invalid heartbeat under subkey %.16s...: %s", str(subkey), reason)


class SwarmWatcher:
    """Everyone's heartbeats for a run, whatever manifests its peers use (for the monitor)."""

    def __init__(self, transport: Transport, run_id: str, ttl: float = 10.0, clock: Callable[[], float] = time.time):
        from swarmloco.protocol.manifest import run_key

        self.transport, self.ttl, self.clock = transport, ttl, clock
        self.run_id, self.run_key = run_id, run_key(run_id)

    def fetch(self) -> list[dict]:
        from swarmloco.protocol.manifest import read_manifests

        found = read_manifests(self.transport.get(self.run_key), self.run_id, self.clock())
        manifests = {m.manifest.hash: m.manifest for m in found}
        peers: list[dict] = []
        for manifest in manifests.values():
            tracker = ProgressTracker(self.transport, manifest.progress_key, self.ttl, None, self.clock)
            for rec in tracker.fetch():
                peers.append({**rec.display_dict(), "manifest": manifest.short})
        return peers
