"""A peer's heartbeats: what it tells the swarm every ``swarm.heartbeat_period``, and what it reads back.

The heartbeat thread publishes this peer's progress (outer step, state, digest, samples, its signatures of
recent rounds), re-reads the manifest and tokens now and then, and hands every view of the swarm to the status
board, the lineage (mates' signatures), the catch-up thread, the ``target_samples`` count and the clock check.
"""

from __future__ import annotations

import logging
import threading
import time

from swarmloco.config import SwarmConfig
from swarmloco.node.membership import REFRESH_BEATS, Membership
from swarmloco.node.peer_state import PeerState
from swarmloco.node.phase import InnerPhase
from swarmloco.node.state_sync import DIGEST_CHARS
from swarmloco.node.status import StatusBoard
from swarmloco.node.sync import READY_STATES, Synchronizer
from swarmloco.protocol.progress import PeerProgress, ProgressTracker

logger = logging.getLogger(__name__)


class Heartbeats:
    """This peer's published progress and the thread that publishes it (see the module doc)."""

    def __init__(self, *, peer: PeerState, phase: InnerPhase, tracker: ProgressTracker, sync: Synchronizer,
                 membership: Membership, catchup, board: StatusBoard, cfg: SwarmConfig, target_samples: int,
                 halt: threading.Event, stop: threading.Event):
        self.peer, self.phase, self.tracker, self.sync = peer, phase, tracker, sync
        self.membership, self.catchup, self.board, self.cfg = membership, catchup, board, cfg
        self.target_samples, self.halt, self.stop = target_samples, halt, stop
        self.transport = peer.transport
        self.state = "joining"
        """What this peer does now: joining, training, ready, averaging or stopped."""
        self.attempt = 0
        """Which try of the current round (a re-run's members find each other by it)."""
        self.rerun = ""
        """Why the round is re-run: "broken" or "decided" (see ``PeerProgress.rerun``)."""
        self.round_bytes: int | None = None
        # asked once (each call is an RPC to the DHT); a peer in client mode announces none: it cannot be dialled
        self.maddrs = () if cfg.client_mode else tuple(self.transport.visible_maddrs()[:4])
        self._known_peers: set[str] = set()
        self._clock_warned = False
        self._thread: threading.Thread | None = None

    def set_state(self, state: str) -> None:
        self.state = state
        self.board.update(state=state)

    def progress(self) -> PeerProgress:
        step, digest = self.peer.step_and_digest()  # (they change together)
        return PeerProgress(
            peer_id=self.transport.peer_id, outer_step=step, state=self.state, time=time.time(),
            samples=self.phase.samples_since_sync, samples_per_second=self.phase.samples_per_second,
            maddrs=self.maddrs, round_time=self.board.get("last_round_time"), bytes_per_round=self.round_bytes,
            digest=digest[:DIGEST_CHARS], attempt=self.attempt, rerun=self.rerun,
            suspects=self.sync.named_suspects() if self.rerun == "broken" else (),
            attest=tuple(self.peer.attest))

    def publish(self) -> None:
        self.tracker.publish(self.progress())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        beats = 0
        while not self.halt.wait(self.cfg.heartbeat_period) and not self.stop.is_set():
            if self.state != "stopped":  # also while averaging: a long round must not look like a dead peer
                self.publish()
            beats += 1
            try:
                if beats % REFRESH_BEATS == 0:
                    self.membership.refresh()
                elif self.membership.tokens_due:  # a stranger's heartbeat: maybe a token was just issued
                    self.membership.refresh_tokens()
            except Exception as e:  # noqa: BLE001 - a DHT hiccup: the next refresh tries again
                logger.warning("refreshing the manifest and tokens failed: %s", e)
            try:
                peers = self.tracker.fetch()
            except Exception as e:  # noqa: BLE001
                logger.debug("progress fetch failed: %s", e)
                continue
            self.board.update(peers_online=len(peers), swarm=[p.display_dict() for p in peers])
            self._note_membership({p.peer_id for p in peers} - {self.transport.peer_id})
            self.peer.collect_signatures(peers)
            self.catchup.offer(self.sync.live(peers))
            self._check_target_samples(peers)
            self._check_clock()

    def _check_clock(self) -> None:
        """Say once (log, status board, monitor's events) when this machine's clock is off the swarm's, and
        again once it is back in step; the board always shows the offset."""
        found, problem = self.tracker.clock_check.offset(), self.tracker.clock_check.problem()
        self.board.update(clock_offset_s=None if found is None else round(found[0], 1), clock_off=problem is not None)
        if problem is not None and not self._clock_warned:
            logger.warning("%s", problem)
            self.board.event("clock", problem)
        elif problem is None and self._clock_warned:
            self.board.event("clock", "this machine's clock is back in step with the swarm's")
        self._clock_warned = problem is not None

    def _check_target_samples(self, peers: list[PeerProgress]) -> None:
        """target_samples mode, while training: the round is due once the live peers at this step did enough."""
        step = self.peer.outer_step
        if self.state != "training" or not self.target_samples:
            return
        now, me = time.time(), self.transport.peer_id
        others = [p for p in self.sync.live(peers) if p.peer_id != me and p.outer_step == step]
        total = sum(p.samples + (p.samples_per_second * max(0.0, now - p.time) if p.state == "training" else 0)
                    for p in others)
        if self.peer.outer_step != step:  # the round ended while we looked: these counts are stale
            return
        self.phase.swarm_samples = int(total)
        if any(p.state in READY_STATES for p in others) or \
                total + self.phase.samples_since_sync >= self.target_samples:
            self.phase.target_reached.set()  # someone saw the target reached, or we do: join the round now

    def _note_membership(self, others: set[str]) -> None:
        for peer_id in sorted(others - self._known_peers):
            self.board.event("peer_joined", f"peer {peer_id[-8:]} joined")
        for peer_id in sorted(self._known_peers - others):
            self.board.event("peer_left", f"peer {peer_id[-8:]} left (no heartbeat for "
                             f"{self.cfg.heartbeat_ttl:.0f}s)")
        self._known_peers = others


__all__ = ["Heartbeats"]
