"""One sync round: wait for the round's peers, average pseudo-gradients, decide whether it commits.

Life of a round for outer step ``r`` (see ARCHITECTURE.md):

1. **Ready barrier.** The peer heartbeats ``state=ready, outer_step=r`` and polls the DHT until every
   live peer at step ``r`` is ready too (and, before its first round, at least ``swarm.min_peers``
   peers are), bounded by ``swarm.ready_timeout``. Without it, fast peers would average alone
   before slow ones are even visible.
2. **Averaging.** ``Transport.start_round`` runs DHT matchmaking plus the exact butterfly all-reduce
   in the background, the pseudo-gradient weighted by the samples this peer processed. The handle
   can be waited on later, so training can go on beside a round (overlap comes with it).
3. **Commit decision** from data every group member shares (the gathered metadata): the round
   commits only if all members were at outer step ``r``. Any failure - no group, timeout, a dead
   reducer, a partial result, a bad part - is a :class:`RoundOutcome` with ``ok=False``.

A peer alone at its step (nobody else live) skips the network and commits its own pseudo-gradient.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from swarmloco.config import SwarmConfig
from swarmloco.protocol.progress import PeerProgress, ProgressTracker
from swarmloco.protocol.transport import RoundHandle, RoundOutcome, Transport

logger = logging.getLogger(__name__)

READY_STATES = ("ready", "averaging")


@dataclass(frozen=True)
class BarrierResult:
    ready: tuple[str, ...]
    """Peer ids ready for this round (this peer included)."""
    waited_s: float
    timed_out: bool


class _LocalRound:
    """A round of one: no network, the peer's own pseudo-gradient is the average."""

    def __init__(self, tensors: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], peer_id: str, gather: dict):
        for out, t in zip(outputs, tensors):
            out.copy_(t)
        self.outcome = RoundOutcome(ok=True, gathered={peer_id: gather})

    def done(self) -> bool:
        return True

    def result(self) -> RoundOutcome:
        return self.outcome


class Synchronizer:
    """Runs sync rounds for one peer over a :class:`Transport`."""

    def __init__(self, transport: Transport, tracker: ProgressTracker, cfg: SwarmConfig,
                 heartbeat: Callable[[], PeerProgress], stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.time, poll_interval: float = 0.2):
        self.transport, self.tracker, self.cfg = transport, tracker, cfg
        self.heartbeat = heartbeat
        self.stop = stop or threading.Event()
        self.clock, self.poll_interval = clock, poll_interval
        self.rounds_joined = 0

    def wait_for_peers(self, outer_step: int) -> BarrierResult:
        """Block until the round's peers are ready (bounded by ready_timeout)."""
        start = self.clock()
        deadline = start + self.cfg.ready_timeout
        need = self.cfg.min_peers if self.rounds_joined == 0 else 1
        me = self.transport.peer_id
        while True:
            self.tracker.publish(replace(self.heartbeat(), state="ready", outer_step=outer_step, time=self.clock()))
            peers = self.tracker.fetch()
            at_step = [p for p in peers if p.outer_step == outer_step or p.peer_id == me]
            ready = sorted({p.peer_id for p in at_step if p.state in READY_STATES} | {me})
            # peers still finishing the previous round will be at this step in a moment: wait for them too
            finishing = [p for p in peers if p.outer_step == outer_step - 1 and p.state in READY_STATES]
            waiting_for = [p.peer_id for p in at_step + finishing if p.peer_id not in ready]
            if len(ready) >= need and not waiting_for:
                return BarrierResult(tuple(ready), self.clock() - start, timed_out=False)
            if self.clock() >= deadline or self.stop.is_set():
                logger.info("ready barrier for outer step %d timed out after %.1fs: %d ready, waiting for %s",
                            outer_step, self.clock() - start, len(ready), [p[:12] for p in waiting_for] or f"{need} peers")
                return BarrierResult(tuple(ready), self.clock() - start, timed_out=True)
            self.stop.wait(self.poll_interval)

    def start(self, outer_step: int, tensors: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
              samples: int) -> tuple[RoundHandle, BarrierResult]:
        """Barrier, then begin averaging ``tensors`` into ``outputs``; returns at once after the barrier."""
        barrier = self.wait_for_peers(outer_step)
        self.rounds_joined += 1
        gather = {"outer_step": int(outer_step), "samples": int(samples)}
        if len(barrier.ready) <= 1:
            return _LocalRound(tensors, outputs, self.transport.peer_id, gather), barrier
        self.tracker.publish(replace(self.heartbeat(), state="averaging", outer_step=outer_step, time=self.clock()))
        scheduled = self.clock() + self.cfg.matchmaking_time
        find_timeout = self.cfg.matchmaking_time + 2 * self.cfg.request_timeout + 5.0
        handle = self.transport.start_round(tensors, outputs, weight=max(1, samples), gather=gather,
                                            scheduled_time=scheduled, timeout=find_timeout,
                                            expected_group_size=len(barrier.ready))
        return handle, barrier

    @staticmethod
    def decide(outcome: RoundOutcome, outer_step: int) -> RoundOutcome:
        """Commit only if every group member averaged the same outer step (all members decide alike)."""
        if not outcome.ok:
            return outcome
        steps = {m.get("outer_step") for m in outcome.gathered.values()}
        if steps != {outer_step}:
            return replace(outcome, ok=False, error=f"group mixed outer steps {sorted(map(str, steps))}")
        return outcome
