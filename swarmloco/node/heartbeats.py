"""A peer's heartbeats: what it tells the swarm every ``swarm.heartbeat_period``, and what it reads back.

A mixin of :class:`swarmloco.node.diloco.DiLoCo`: the heartbeat thread publishes this peer's progress (outer
step, state, digest, samples, its signatures of recent rounds), re-reads the manifest and tokens now and then,
and hands every view of the swarm to the status board, the catch-up thread and the ``target_samples`` count.
"""

from __future__ import annotations

import logging
import time

from swarmloco.node.membership import REFRESH_BEATS
from swarmloco.node.state_sync import DIGEST_CHARS
from swarmloco.node.sync import READY_STATES
from swarmloco.protocol.progress import PeerProgress

logger = logging.getLogger(__name__)


class Heartbeats:
    """Heartbeats of :class:`~swarmloco.node.diloco.DiLoCo` (see the module doc)."""

    def _progress(self) -> PeerProgress:
        with self._lock:  # the step and digest change together
            step, digest = self.outer_step, self.digest
        return PeerProgress(
            peer_id=self.transport.peer_id, outer_step=step, state=self._state, time=time.time(),
            samples=self._samples_since_sync, samples_per_second=self._last_sps, maddrs=self._maddrs,
            round_time=self.board.get("last_round_time"), bytes_per_round=self._last_round_bytes,
            digest=digest[:DIGEST_CHARS], attempt=self._attempt, rerun=self._rerun,
            suspects=self.sync.named_suspects() if self._rerun == "broken" else (),
            attest=tuple(self._attest))

    def _heartbeat_loop(self) -> None:
        beats = 0
        while not self._halt.wait(self.cfg_swarm.heartbeat_period) and not self.stop.is_set():
            if self._state != "stopped":  # also while averaging: a long round must not look like a dead peer
                self.tracker.publish(self._progress())
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
            self._collect_signatures(peers)
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
        step = self.outer_step
        if self._state != "training" or not self.outer_cfg.target_samples:
            return
        now, me = time.time(), self.transport.peer_id
        others = [p for p in self.sync.live(peers) if p.peer_id != me and p.outer_step == step]
        total = sum(p.samples + (p.samples_per_second * max(0.0, now - p.time) if p.state == "training" else 0)
                    for p in others)
        if self.outer_step != step:  # the round ended while we looked: these counts are stale
            return
        self._swarm_samples = int(total)
        if any(p.state in READY_STATES for p in others) or \
                total + self._samples_since_sync >= self.outer_cfg.target_samples:
            self._round_due.set()  # someone saw the target reached, or we do: join the round now

    def _note_membership(self, others: set[str]) -> None:
        for peer_id in sorted(others - self._known_peers):
            self.board.event("peer_joined", f"peer {peer_id[-8:]} joined")
        for peer_id in sorted(self._known_peers - others):
            self.board.event("peer_left", f"peer {peer_id[-8:]} left (no heartbeat for "
                             f"{self.cfg_swarm.heartbeat_ttl:.0f}s)")
        self._known_peers = others
