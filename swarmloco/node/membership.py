"""This peer's standing in the swarm: the manifest it runs, who may join, whom it refuses.

* **Manifest.** On start, the manifest published under the run's name is checked against ours
  (:class:`~swarmloco.protocol.manifest.ManifestMismatch` names the differing fields). In an owned run only
  the owner's signed manifest counts and this peer re-publishes the owner's record as it is; in an unowned run
  it publishes its own, signed by itself. Either way it lists the run in the directory ``swarmloco join`` reads.
* **Access (private runs).** The owner's tokens are read from the DHT (and re-published, so they live as long
  as the swarm); a peer without a valid token is refused at start (:class:`AccessRefused`), its heartbeats are
  ignored and matchmaking and state download refuse it (:mod:`swarmloco.protocol.gate`). An expired token drops
  its peer at the next refresh.
* **Exclusion** for ``swarm.exclude_rounds`` outer steps (refused at matchmaking, not waited for; then welcome
  again): a peer that sent invalid data in a round (NaN/Inf, undecodable, wrong size or weight), one whose
  update was clipped in two rounds in a row, and one that timed out in two failed attempts in a row in which no
  peer died or cheated (a live peer is only late because of a dead one when someone did die).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from swarmloco.config import SwarmConfig
from swarmloco.node.status import StatusBoard
from swarmloco.protocol.access import read_tokens
from swarmloco.protocol.identity import Identity, peer_id_of_public_key
from swarmloco.protocol.manifest import (INDEX_KEY, ManifestMismatch, RunManifest, SignedManifest,
                                         check_against_swarm, read_manifests, sign_index_entry, sign_manifest)
from swarmloco.protocol.interface import RoundOutcome, Transport

logger = logging.getLogger(__name__)

CLIP_STRIKES = 2
"""Rounds in a row a peer's update may be clipped before it is excluded."""
STALL_STRIKES = 2
"""Failed rounds (or re-runs) in a row a peer may time out in, with nobody else failing, before it is
excluded: a peer that joins groups and never answers (a staller) would otherwise fail every round."""
REFRESH_BEATS = 10
"""Heartbeats between two refreshes of the manifest, the directory entry and the tokens."""


class AccessRefused(RuntimeError):
    """This peer holds no valid access token for a private run."""


class Membership:
    """Publishes what this peer runs and decides whom it averages with (see the module doc)."""

    def __init__(self, manifest: RunManifest, transport: Transport, identity: Identity, swarm: SwarmConfig,
                 board: StatusBoard | None = None, clock: Callable[[], float] = time.time):
        self.manifest, self.transport, self.identity, self.swarm = manifest, transport, identity, swarm
        self.board = board or StatusBoard()
        self.clock = clock
        self.owner = manifest.owner
        self.owner_record: SignedManifest | None = None  # the owner's signed manifest, re-published as it is
        self.admitted: dict[bytes, float] = {}  # private runs: token holders' keys -> token expiry
        self._tokens: dict[str, bytes] = {}
        self.excluded: dict[str, int] = {}  # peer id -> first outer step it is welcome again
        self._strikes: dict[str, int] = {}  # peer id -> the outer step of its last clipped round
        self._stalls: dict[str, int] = {}  # peer id -> failed attempts in a row it alone timed out in
        self._gate_pushed: tuple | None = None
        self._lock = threading.RLock()  # the heartbeat thread and the training loop both read and decide
        self.tokens_due = False
        """A heartbeat from a key without a known token was seen: re-read the tokens at the next beat (a
        newly admitted peer is then welcome within a heartbeat, not a refresh period)."""

    # ----- manifest -----------------------------------------------------------------------------
    def announce(self, wait_s: float = 0.0) -> None:
        """Check our manifest against the swarm's, check our access token, then publish.

        ``wait_s``: how long a private run's peer waits for its token to show up in the DHT."""
        published = self._published()
        if self.owner is not None:
            self.owner_record = self._ours(published)
            if not published:
                logger.warning("the owner's signed manifest of run '%s' is not in the DHT (yet); running the "
                               "one in the config, which names owner %s", self.manifest.run_id, self.owner.hex()[:16])
        check_against_swarm(self.manifest, [m.manifest for m in published])
        if self.manifest.private:
            deadline = self.clock() + wait_s
            while not self.refresh_tokens() and self.clock() < deadline:
                time.sleep(0.5)
            if not self.admits(self.identity.public_bytes):
                raise AccessRefused(
                    f"run '{self.manifest.run_id}' is private and no valid access token for this peer's key "
                    f"{self.identity.public_hex} was found; ask the owner for one "
                    f"(swarmloco token OWNER_KEY {self.manifest.run_id} {self.identity.public_hex})")
        self.publish()
        self.push_gate(force=True)

    def _published(self) -> list[SignedManifest]:
        """The manifests under the run's key that count: in an owned run, only the owner's."""
        found = read_manifests(self.transport.get(self.manifest.run_key), self.manifest.run_id, self.clock())
        return [m for m in found if m.author == self.owner] if self.owner is not None else found

    def _ours(self, published: list[SignedManifest]) -> SignedManifest | None:
        return next((m for m in published if m.manifest.hash == self.manifest.hash), None)

    def publish(self) -> None:
        """(Re-)publish the manifest record, our directory entry and the tokens we know."""
        now = self.clock()
        ttl = max(60.0, 3 * self.swarm.heartbeat_ttl)
        if self.owner is None:
            raw = sign_manifest(self.manifest, self.identity, now + ttl)
            self.transport.store(self.manifest.run_key, self.identity.public_hex, raw, now + ttl)
        elif self.owner_record is not None and self.owner_record.expires > now:
            self.transport.store(self.manifest.run_key, self.owner.hex(), self.owner_record.raw,
                                 self.owner_record.expires)
        self.transport.store(INDEX_KEY, self.identity.public_hex,
                             sign_index_entry(self.manifest, self.identity, now + ttl), now + ttl)
        for subkey, raw in self._tokens.items():
            peer = bytes.fromhex(subkey.split(":", 1)[1])
            if self.admitted.get(peer, 0.0) > now:
                self.transport.store(self.manifest.tokens_key, subkey, raw, self.admitted[peer])

    def refresh(self) -> None:
        """Every few heartbeats: re-read tokens, re-publish, push the gate if it changed."""
        if self.owner is not None and self.owner_record is None:  # the owner published after we started
            self.owner_record = self._ours(self._published())
        if self.manifest.private:
            self.refresh_tokens()
        self.publish()
        self.push_gate()

    # ----- access -------------------------------------------------------------------------------
    def refresh_tokens(self) -> bool:
        """Re-read the owner's tokens; True if this peer holds a valid one."""
        self.tokens_due = False
        values = self.transport.get(self.manifest.tokens_key)
        now = self.clock()
        self.admitted = read_tokens(values, self.owner, self.manifest.run_id, now)
        self._tokens = {k: v for k, v in values.items() if k.split(":", 1)[-1] in {p.hex() for p in self.admitted}}
        self.push_gate()
        return self.identity.public_bytes == self.owner or self.admitted.get(self.identity.public_bytes, 0.0) > now

    def admits(self, public_key: bytes) -> bool:
        """Whether records and rounds of the peer with ``public_key`` count (always, unless private)."""
        if not self.manifest.private:
            return True
        if public_key == self.owner or self.admitted.get(public_key, 0.0) > self.clock():
            return True
        self.tokens_due = True
        return False

    # ----- exclusion ----------------------------------------------------------------------------
    def note_round(self, outcome: RoundOutcome, outer_step: int) -> None:
        """Strikes from a finished round (committed or not): rejected data excludes, two clips in a row too."""
        me = self.transport.peer_id
        for peer in outcome.rejected:
            if peer != me:
                self.exclude(peer, outer_step, "sent invalid data (NaN/Inf, undecodable, wrong size or weight)")
        for peer in outcome.clipped:
            if peer == me:
                continue
            if self._strikes.get(peer) == outer_step - 1:
                self.exclude(peer, outer_step, f"its update was clipped in {CLIP_STRIKES} rounds in a row")
            self._strikes[peer] = outer_step
        if outcome.ok:
            for peer in outcome.gathered:  # it answered: its count starts over
                self._stalls.pop(peer, None)
        elif outcome.slow and not outcome.suspects:  # nobody died or cheated: the timeouts are their own
            for peer in outcome.slow:
                self._stalls[peer] = self._stalls.get(peer, 0) + 1
                if peer != me and self._stalls[peer] >= STALL_STRIKES:
                    self.exclude(peer, outer_step, f"it timed out in {STALL_STRIKES} failed rounds in a row "
                                 "in which no other peer failed")

    def exclude(self, peer_id: str, outer_step: int, why: str) -> None:
        if not self.swarm.exclude_rounds:
            return
        until = outer_step + self.swarm.exclude_rounds
        with self._lock:
            if self.excluded.get(peer_id, -1) >= until:
                return
            self.excluded[peer_id] = until
        message = f"peer {peer_id[-8:]} excluded until outer step {until}: {why}"
        logger.warning(message)
        self.board.event("peer_excluded", message)
        self.push_gate()

    def refused(self, peer_id: str, outer_step: int) -> bool:
        """Whether this peer does not average with (or wait for) ``peer_id`` at ``outer_step``."""
        with self._lock:
            until = self.excluded.get(peer_id)
            if until is not None and outer_step >= until:
                del self.excluded[peer_id]
                self.push_gate()
                until = None
        return until is not None

    def counts(self, public_key: bytes, outer_step: int) -> bool:
        """Whether a certificate's signer counts as a contributor: admitted (private runs), not excluded."""
        return self.admits(public_key) and not self.refused(peer_id_of_public_key(public_key), outer_step)

    def excluded_peers(self) -> list[str]:
        with self._lock:
            return sorted(self.excluded)

    def push_gate(self, force: bool = False) -> None:
        """Hand the averager process the current decisions (only when they changed)."""
        with self._lock:
            now = self.clock()
            admitted = frozenset(k for k, expires in self.admitted.items() if expires > now) | (
                {self.owner} if self.owner else set())
            gate = (self.manifest.private, admitted, frozenset(self.excluded))
            if force or gate != self._gate_pushed:
                self.transport.set_gate(*gate)
                self._gate_pushed = gate


__all__ = ["AccessRefused", "Membership", "ManifestMismatch"]
