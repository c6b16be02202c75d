"""One outer round of a peer, from its pseudo-gradient to its report.

pseudo-gradient ``global - local`` (fp32 on the CPU; with a lossy codec plus the error-feedback residual)
-> ready barrier, averaging, commit decision, re-runs (:mod:`swarmloco.node.sync`) -> on commit: error
feedback, the outer step and the certificate (:meth:`PeerState.commit`) -> the model := global params
(the landing) -> the report (status board, ``--json-events``, checkpoint). A barrier that finds a heavier
lineage ready ends the round in an adoption instead (this peer's inner work since its last round is dropped).
"""

from __future__ import annotations

import logging
import math
import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from swarmloco.config import OuterConfig, SwarmConfig
from swarmloco.node.buffers import RoundBuffers
from swarmloco.node.membership import Membership
from swarmloco.node.peer_state import PeerState
from swarmloco.node.phase import InnerPhase, InnerResult
from swarmloco.node.status import StatusBoard
from swarmloco.node.sync import Synchronizer
from swarmloco.protocol import faults
from swarmloco.protocol.interface import RoundOutcome, TransportDied
from swarmloco.protocol.progress import PeerProgress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundReport:
    """What one outer round did, as :meth:`DiLoCo.step` returns it (the status board gets every field)."""

    outer_step: int
    """The outer step this peer is at after the round."""
    ok: bool
    """The round committed (or, with ``adopted``, a heavier lineage's state was adopted)."""
    adopted: bool
    peers: int
    """Peers whose pseudo-gradients were averaged (1: alone, or adopted)."""
    train_loss: float
    eval_loss: float
    round_time: float
    """Wall seconds from the end of the previous round to the end of this one (inner steps included)."""
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Everything else the report holds (bytes, timings, attempts, clipped peers, digest...)."""

    @classmethod
    def of(cls, summary: dict[str, Any]) -> RoundReport:
        return cls(outer_step=summary["outer_step"], ok=summary["ok"], adopted=summary["adopted"],
                   peers=summary["peers"], train_loss=summary["train_loss"], eval_loss=summary["eval_loss"],
                   round_time=summary["round_time"], error=summary["error"], details=summary)


def rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def norm(tensors: list[torch.Tensor]) -> float:
    """L2 norm of a list of tensors taken as one vector (one pass over each; NaN or Inf if any value is)."""
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))))) if tensors else 0.0


@dataclass
class RoundWork:
    """One round of one peer, from :meth:`Rounds.prepare` through :meth:`Rounds.exchange` (maybe in a thread of
    its own beside the next inner steps) to its report (:meth:`Rounds.finish`)."""

    step: int
    """The outer step this round is for."""
    index: tuple[int, ...]
    """The parameters it syncs (all, or one streaming fragment's)."""
    inner: Any
    t0: float
    """When its inner phase started (perf_counter)."""
    compute_s: float
    to_send: list[torch.Tensor]
    weight: int
    """Samples behind its pseudo-gradient."""
    blocked_s: float = 0.0
    """Seconds the training loop spent on this round (the whole sync when blocking)."""
    outcome: RoundOutcome | None = None
    behind: Any = None
    """A prepared heavier lineage the barrier found instead of a round (adopt it)."""
    attempts: int = 1
    barrier_s: float = 0.0
    sync_s: float = 0.0
    outer_s: float = 0.0
    retried: list[str] = field(default_factory=list)
    rejected: set[str] = field(default_factory=set)
    sent_norm: float = 0.0
    """The norm of what this peer contributed."""
    update_norm: float = float("nan")
    digest: str | None = None
    """The global parameters' digest this round committed (rounds in flight after it may have moved them)."""
    landed_after: int | None = None
    """Inner steps between its start and its landing (overlapped rounds: its staleness, tau)."""


class Rounds:
    """Runs this peer's rounds over its buffers, agreed state and swarm (see the module doc)."""

    def __init__(self, *, buffers: RoundBuffers, peer: PeerState, phase: InnerPhase, heartbeats, sync: Synchronizer,
                 membership: Membership, catchup, board: StatusBoard, codec, outer: OuterConfig, swarm: SwarmConfig,
                 parts: list[tuple[int, ...]], stop: threading.Event, evaluate: Callable[[], float] | None):
        self.buffers, self.peer, self.phase, self.heartbeats, self.sync = buffers, peer, phase, heartbeats, sync
        self.membership, self.catchup, self.board, self.codec = membership, catchup, board, codec
        self.outer, self.retries, self.parts, self.stop = outer, swarm.round_retries, parts, stop
        self.evaluate_fn = evaluate
        self.error_feedback = peer.error_feedback
        self.transport = peer.transport
        self.mates: set[str] = set()
        """Peers of this step's attempts and of our last commit."""
        self.initial_eval_loss = float("nan")

    # ----- evaluation ---------------------------------------------------------------------------------
    def evaluate(self) -> float:
        return float(self.evaluate_fn()) if self.evaluate_fn is not None else float("nan")

    def evaluate_global(self, step: int | None = None) -> float:
        """``evaluate()`` of the global parameters after a committed round: every round, or with streaming
        fragments once every ``fragments`` rounds (NaN between: a round moves only one fragment). When the model
        holds this peer's own parameters (rounds overlapped, or the unsent rest kept in it) the global ones are
        put in for the evaluation. ``step``: the outer step the landing round committed (default: the peer's)."""
        if self.evaluate_fn is None or (self.peer.outer_step if step is None else step) % self.outer.fragments:
            return float("nan")
        if not self.outer.overlapped and not self.peer.rest_in_model:
            return self.evaluate()
        with self.buffers.global_in_model():
            return self.evaluate()

    # ----- one round ----------------------------------------------------------------------------------
    def inner_result(self, in_flight_samples: int = 0) -> InnerResult:
        """The inner phase that just ended, also shown on the status board."""
        inner = self.phase.result(in_flight_samples)
        self.board.update(inner_steps_total=self.phase.inner_step, train_loss=inner.mean_loss,
                          samples_per_second=self.phase.samples_per_second, inner_step=inner.steps)
        return inner

    def prepare(self, inner: InnerResult, index: Sequence[int], step: int | None = None,
                weight: int | None = None) -> RoundWork:
        """The round's pseudo-gradient (with a lossy codec plus the error-feedback residual) for ``index``; the
        round is for outer ``step`` (default: the peer's) and carries ``weight`` samples (default: all since the
        last committed round)."""
        t0 = self.phase.started
        compute_s = time.perf_counter() - t0 - self.phase.blocked
        pseudo = self.buffers.pseudo_gradient(index)
        pseudo_norm = norm(pseudo)
        if not math.isfinite(pseudo_norm):
            raise FloatingPointError("pseudo-gradient holds NaN/Inf: the local model diverged")
        to_send = pseudo
        if self.error_feedback is not None:  # what compression drops now is added to the next round's
            to_send = [self.error_feedback.compensate(i, g) for i, g in zip(index, pseudo)]
        to_send = faults.poison(to_send)  # a hostile peer, in tests only (SWARMLOCO_FAULT)
        dead = self.transport.dead()
        if dead:  # no round can ever succeed: say so instead of failing every one of them
            raise TransportDied(f"{dead}: this peer can no longer average; restart it (--resume keeps its progress)")
        return RoundWork(step=self.peer.outer_step if step is None else step, index=tuple(index), inner=inner, t0=t0,
                         compute_s=compute_s, to_send=to_send,
                         weight=self.phase.samples_since_sync if weight is None else weight,
                         sent_norm=pseudo_norm if to_send is pseudo else norm(to_send))

    def exchange(self, work: RoundWork) -> None:
        """Ready barrier, averaging, commit decision and re-runs; on commit the outer step and the certificate.
        Only the global state changes here (under the state's lock), never the model: this may run beside the
        training loop. Sets ``work.outcome`` (or ``work.behind``)."""
        beats = self.heartbeats
        beats.set_state("ready")
        t1 = time.perf_counter()
        step, attempt = work.step, 0
        outputs = [self.buffers.averaged[i] for i in work.index]
        parts = None if len(work.index) == len(self.buffers.global_params) else work.index
        while True:
            beats.attempt = attempt
            handle, barrier = self.sync.start(step, work.to_send, outputs, faults.poison_weight(work.weight), attempt,
                                              parts=parts)
            work.barrier_s += barrier.waited_s
            if handle is None:  # a heavier lineage is ready: adopt its state, drop this round's inner work
                beats.attempt, beats.rerun = 0, ""
                work.behind = barrier.behind
                return
            self.mates.update(barrier.ready)
            logger.info("outer step %d: %d peer(s) ready after %.1fs%s%s", step, len(barrier.ready),
                        barrier.waited_s, " (timed out)" if barrier.timed_out else "",
                        f" (re-run {attempt})" if attempt else "")
            beats.set_state("averaging")
            outcome = self.sync.wait(handle, step, attempt, barrier.ready)
            work.rejected.update(outcome.rejected)
            if outcome.ok or len(barrier.ready) <= 1 or attempt >= self.retries or self.stop.is_set():
                break
            self.sync.note_failure(outcome)
            self.membership.note_round(outcome, step)  # rejected peers: not in the re-run either
            work.retried.append(outcome.error)
            attempt += 1
            # a group that decided not to commit leaves nobody stuck: its re-run must not make other groups of
            # this attempt give theirs up (their all-reduce may well commit; this peer then catches up)
            beats.rerun = "decided" if outcome.decided else "broken"
            self.board.add(rounds_retried=1)
            self.board.event("round_retry", f"outer step {step}: {outcome.error}; re-running it"
                             + (f" without {', '.join(s[-8:] for s in outcome.suspects)}" if outcome.suspects else ""))
            logger.warning("round for outer step %d failed (%s); re-running it among the survivors", step,
                           outcome.error)
            beats.set_state("ready")
        work.sync_s = time.perf_counter() - t1
        work.outcome, work.attempts = outcome, attempt + 1
        beats.attempt, beats.rerun = 0, ""
        self.membership.note_round(outcome, step)

        t2 = time.perf_counter()
        decoded = None
        if outcome.ok and self.error_feedback is not None:  # keep what the codec did not carry
            codec = self.codec.for_round(step)  # (the rotate codec's values depend on the round)
            decoded = [codec.roundtrip(sent) for sent in work.to_send]
            if outcome.group_size <= 1:  # alone: the update a group of one would average (the simulator's
                for out, d in zip(outputs, decoded):  # rule), not the whole accumulator every lone round
                    out.copy_(d)
        work.update_norm = norm(outputs) if outcome.ok else float("nan")  # the group's average it applies
        if outcome.ok:
            self._commit(work, decoded)
        else:
            self.board.add(rounds_failed=1)
            self.board.event("round_failed", f"outer step {step}: {outcome.error}")
            logger.warning("round for outer step %d failed: %s", step, outcome.error)
        work.outer_s = time.perf_counter() - t2

    def _commit(self, work: RoundWork, decoded: list[torch.Tensor] | None) -> None:
        outcome = work.outcome
        work.digest = self.peer.commit(outcome, work.index, self.buffers.averaged, work.to_send, decoded)
        step = work.step
        self.mates = set(outcome.gathered)
        self.sync.committed(step, work.attempts - 1)
        self.board.add(rounds_ok=1)
        for peer_id in outcome.clipped:
            self.board.event("contribution_clipped", f"outer step {step}: the update of peer "
                             f"{peer_id[-8:]} was far above the group's median and was clipped")
        for peer_id in outcome.capped:
            self.board.event("contribution_clipped", f"outer step {step}: peer {peer_id[-8:]} "
                             "claimed far more samples than the group's median; its weight was capped")

    def finish(self, work: RoundWork, eval_loss: float) -> RoundReport:
        """The round's report (status board, ``--json-events``) and a checkpoint when one is due."""
        outcome, peer = work.outcome, self.peer
        # with rounds in flight after this one the peer may be further already: the report says this round's state
        step, digest = (work.step + 1, work.digest) if outcome.ok and work.digest else (peer.outer_step, peer.digest)
        now = time.perf_counter()
        overlapped = self.outer.overlapped  # then a round's time is the time between two landings
        round_time = now - (self.phase.last_landed if overlapped else work.t0)
        self.phase.last_landed = now
        self.board.add(bytes_sent_total=outcome.bytes_sent, bytes_received_total=outcome.bytes_received)
        self.heartbeats.round_bytes = outcome.bytes_sent + outcome.bytes_received
        last_round = {
            "outer_step": step, "ok": outcome.ok, "peers": max(1, outcome.group_size),
            "compute_s": work.compute_s, "barrier_s": work.barrier_s, "matchmaking_s": outcome.matchmaking_s,
            "allreduce_s": outcome.allreduce_s, "outer_step_s": work.outer_s, "bytes_sent": outcome.bytes_sent,
            "bytes_received": outcome.bytes_received, "compression_ratio": 1.0 / self.codec.expected_ratio(),
            "error": outcome.error, "attempts": work.attempts, "inner_steps": work.inner.steps,
            "blocked_s": work.blocked_s, "overlapped": overlapped,
        }
        evaluated = {"eval_loss": eval_loss} if math.isfinite(eval_loss) else {}  # (fragments: not every round)
        device = self.buffers.device
        self.board.update(outer_step=peer.outer_step, **evaluated, last_round=last_round,
                          last_round_time=round_time, rss_bytes=rss_bytes(),
                          cuda_allocated_bytes=torch.cuda.memory_allocated() if device.type == "cuda" else None)
        summary = {
            "peer_id": self.transport.peer_id, "outer_step": step, "ok": outcome.ok,
            "train_loss": work.inner.mean_loss, "eval_loss": eval_loss, "peers": max(1, outcome.group_size),
            "samples_per_second": self.phase.samples_per_second, "bytes_sent": outcome.bytes_sent,
            "bytes_received": outcome.bytes_received, "round_time": round_time, "sync_s": work.sync_s,
            "compute_s": work.compute_s, "blocked_s": work.blocked_s, "overlapped": overlapped,
            "barrier_s": work.barrier_s, "matchmaking_s": outcome.matchmaking_s, "allreduce_s": outcome.allreduce_s,
            "outer_step_s": work.outer_s, "landed_after_steps": work.landed_after,
            "fragment": self.parts.index(work.index) if len(self.parts) > 1 else 0, "fragments": len(self.parts),
            "digest": digest, "error": outcome.error, "fp32_bytes": self.buffers.fp32_bytes,
            "initial_eval_loss": self.initial_eval_loss, "attempts": work.attempts, "inner_steps": work.inner.steps,
            "samples": work.inner.samples, "adopted": False, "retried": work.retried,
            "sent_norm": work.sent_norm, "update_norm": work.update_norm, "clipped": list(outcome.clipped),
            "capped": list(outcome.capped), "rejected": sorted(work.rejected),
            "excluded": self.membership.excluded_peers(),
        }
        self.board.round_done(summary)
        if outcome.ok:
            peer.checkpoint_if_due()
        return RoundReport.of(summary)

    def run(self, inner: InnerResult, index: Sequence[int]) -> RoundReport:
        """A blocking round over the parameters ``index`` for the peer's current outer step: the training loop
        waits for it; on commit the model (the round's parameters) lands on the new global params."""
        t = time.perf_counter()
        work = self.prepare(inner, index)
        self.exchange(work)
        if work.behind is not None:  # a heavier lineage is ready: adopt its state, drop this round's inner work
            return self.adopt(work.behind, inner, work.t0)
        eval_loss = float("nan")
        if work.outcome.ok:
            self.peer.restore_model(work.index, keep_rest=True)
            self.phase.landed(work.weight)
            eval_loss = self.evaluate_global()
        work.blocked_s = time.perf_counter() - t
        return self.finish(work, eval_loss)

    # ----- a heavier lineage instead of a round -------------------------------------------------------
    def behind_check(self, peers: list[PeerProgress], mates_only: bool) -> tuple[object, bool]:
        """For the barrier: a prepared adoption, and whether a verdict on a recent mate's claim is due."""
        self.catchup.offer(peers)
        among = self.mates if self.sync.rounds_joined else {p.peer_id for p in peers}
        return self.catchup.pending, self.catchup.unjudged(peers, among)

    def adopt(self, pending, inner: InnerResult, t0: float, taken=None) -> RoundReport:
        """Adopt the prepared heavier lineage instead of (or before) a round; its report. ``taken``: the adoption
        already taken from the catch-up (else it is taken here)."""
        peer = self.peer
        pending = taken if taken is not None else self.catchup.take(peer.chain_snapshot())
        ok = pending is not None
        if ok:
            peer.adopt(pending)
        eval_loss = self.evaluate() if ok else float("nan")
        self.board.update(outer_step=peer.outer_step, eval_loss=eval_loss)
        summary = {
            "peer_id": self.transport.peer_id, "outer_step": peer.outer_step, "ok": ok, "adopted": True,
            "train_loss": inner.mean_loss, "eval_loss": eval_loss, "peers": 1,
            "samples_per_second": self.phase.samples_per_second, "bytes_sent": 0, "bytes_received": 0,
            "round_time": time.perf_counter() - t0, "sync_s": 0.0, "digest": peer.digest,
            "error": None if ok else "the prepared adoption no longer outweighs this peer's lineage",
            "fp32_bytes": self.buffers.fp32_bytes, "initial_eval_loss": self.initial_eval_loss,
            "attempts": 0, "inner_steps": inner.steps, "samples": inner.samples, "clipped": [], "capped": [],
            "rejected": [], "excluded": self.membership.excluded_peers(),
        }
        self.board.round_done(summary)
        if ok:
            peer.checkpoint_if_due()  # an adopted state is as good a restart point as a committed one
        return RoundReport.of(summary)


__all__ = ["RoundReport", "RoundWork", "Rounds", "norm"]
