"""One outer round of a :class:`~swarmloco.node.diloco.DiLoCo` peer, from its pseudo-gradient to its report.

pseudo-gradient ``global - local`` (fp32 on the CPU; with a lossy codec plus the error-feedback residual)
-> ready barrier, averaging, commit decision, re-runs (:mod:`swarmloco.node.sync`) -> on commit: error
feedback, the outer step, the certificate, the model := global params -> the report (status board,
``--json-events``, checkpoint). A barrier that finds a heavier lineage ready ends the round in an adoption
instead (this peer's inner work since its last round is dropped).
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from swarmloco.node.state_sync import params_digest
from swarmloco.outer_optim import apply_outer_step
from swarmloco.protocol import faults
from swarmloco.protocol.interface import RoundOutcome, TransportDied

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


@torch.no_grad()
def pseudo_gradient(engine, index: Sequence[int]) -> list[torch.Tensor]:
    """``global - local`` of the parameters ``index`` in fp32 on the CPU, into ``engine._pseudo`` (one device
    sync for all tensors); ``engine._staging`` keeps the local parameters."""
    params = list(engine.model.parameters())
    for i in index:
        engine._staging[i].copy_(params[i].detach(), non_blocking=True)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    for i in index:
        torch.sub(engine.global_params[i], engine._staging[i], out=engine._pseudo[i])
    return [engine._pseudo[i] for i in index]


@dataclass
class RoundWork:
    """One round of one peer, from its start (:func:`prepare`) through its exchange (:func:`exchange`, maybe in
    a thread of its own beside the next inner steps) to its report (:func:`finish`)."""

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


def prepare(engine, inner, index: Sequence[int], step: int | None = None, weight: int | None = None) -> RoundWork:
    """The round's pseudo-gradient (with a lossy codec plus the error-feedback residual) for ``index``; the
    round is for outer ``step`` (default: the peer's) and carries ``weight`` samples (default: all since the
    last committed round)."""
    t0 = engine._round_started
    compute_s = time.perf_counter() - t0 - engine._phase_blocked
    pseudo = pseudo_gradient(engine, index)
    pseudo_norm = norm(pseudo)
    if not math.isfinite(pseudo_norm):
        raise FloatingPointError("pseudo-gradient holds NaN/Inf: the local model diverged")
    to_send = pseudo
    if engine.error_feedback is not None:  # what compression drops now is added to the next round's
        to_send = [engine.error_feedback.compensate(i, g) for i, g in zip(index, pseudo)]
    to_send = faults.poison(to_send)  # a hostile peer, in tests only (SWARMLOCO_FAULT)
    dead = engine.transport.dead()
    if dead:  # no round can ever succeed: say so instead of failing every one of them
        raise TransportDied(f"{dead}: this peer can no longer average; restart it (--resume keeps its progress)")
    return RoundWork(step=engine.outer_step if step is None else step, index=tuple(index), inner=inner, t0=t0,
                     compute_s=compute_s, to_send=to_send,
                     weight=engine._samples_since_sync if weight is None else weight,
                     sent_norm=pseudo_norm if to_send is pseudo else norm(to_send))


def exchange(engine, work: RoundWork) -> None:
    """Ready barrier, averaging, commit decision and re-runs; on commit the outer step and the certificate.
    Only the global state changes here (under the engine's lock), never the model: this may run beside the
    training loop. Sets ``work.outcome`` (or ``work.behind``)."""
    engine._set_state("ready")
    t1 = time.perf_counter()
    step, retries = work.step, engine.cfg_swarm.round_retries
    attempt, outputs = 0, [engine._averaged[i] for i in work.index]
    parts = None if len(work.index) == len(engine.global_params) else work.index
    while True:
        engine._attempt = attempt
        handle, barrier = engine.sync.start(step, work.to_send, outputs, faults.poison_weight(work.weight), attempt,
                                            parts=parts)
        work.barrier_s += barrier.waited_s
        if handle is None:  # a heavier lineage is ready: adopt its state, drop this round's inner work
            engine._attempt, engine._rerun = 0, ""
            work.behind = barrier.behind
            return
        engine._mates.update(barrier.ready)
        logger.info("outer step %d: %d peer(s) ready after %.1fs%s%s", step, len(barrier.ready), barrier.waited_s,
                    " (timed out)" if barrier.timed_out else "", f" (re-run {attempt})" if attempt else "")
        engine._set_state("averaging")
        outcome = engine.sync.wait(handle, step, attempt, barrier.ready)
        work.rejected.update(outcome.rejected)
        if outcome.ok or len(barrier.ready) <= 1 or attempt >= retries or engine.stop.is_set():
            break
        engine.sync.note_failure(outcome)
        engine.membership.note_round(outcome, step)  # rejected peers: not in the re-run either
        work.retried.append(outcome.error)
        attempt += 1
        # a group that decided not to commit leaves nobody stuck: its re-run must not make other groups of
        # this attempt give theirs up (their all-reduce may well commit; this peer then catches up)
        engine._rerun = "decided" if outcome.decided else "broken"
        engine.board.add(rounds_retried=1)
        engine.board.event("round_retry", f"outer step {step}: {outcome.error}; re-running it"
                           + (f" without {', '.join(s[-8:] for s in outcome.suspects)}" if outcome.suspects else ""))
        logger.warning("round for outer step %d failed (%s); re-running it among the survivors", step, outcome.error)
        engine._set_state("ready")
    work.sync_s = time.perf_counter() - t1
    work.outcome, work.attempts = outcome, attempt + 1
    engine._attempt, engine._rerun = 0, ""
    engine.membership.note_round(outcome, step)

    t2 = time.perf_counter()
    feedback = None
    if outcome.ok and engine.error_feedback is not None:  # keep what the codec did not carry
        codec = engine.codec.for_round(step)  # (the rotate codec's values depend on the round)
        feedback = [codec.roundtrip(sent) for sent in work.to_send]
        if outcome.group_size <= 1:  # alone: the update a group of one would average (the simulator's
            for out, decoded in zip(outputs, feedback):  # rule), not the whole accumulator every lone round
                out.copy_(decoded)
    work.update_norm = norm(outputs) if outcome.ok else float("nan")  # the group's average it applies
    if outcome.ok:
        _commit(engine, work, feedback)
    else:
        engine.board.add(rounds_failed=1)
        engine.board.event("round_failed", f"outer step {step}: {outcome.error}")
        logger.warning("round for outer step %d failed: %s", step, outcome.error)
    work.outer_s = time.perf_counter() - t2


def finish(engine, work: RoundWork, eval_loss: float) -> RoundReport:
    """The round's report (status board, ``--json-events``) and a checkpoint when one is due."""
    outcome = work.outcome
    # with rounds in flight after this one the peer may be further already: the report says this round's state
    step, digest = (work.step + 1, work.digest) if outcome.ok and work.digest else (engine.outer_step, engine.digest)
    now = time.perf_counter()
    overlapped = engine.overlapped  # then a round's time is the time between two landings
    round_time = now - (engine._last_landed if overlapped else work.t0)
    engine._last_landed = now
    engine.board.add(bytes_sent_total=outcome.bytes_sent, bytes_received_total=outcome.bytes_received)
    engine._last_round_bytes = outcome.bytes_sent + outcome.bytes_received
    last_round = {
        "outer_step": step, "ok": outcome.ok, "peers": max(1, outcome.group_size),
        "compute_s": work.compute_s, "barrier_s": work.barrier_s, "matchmaking_s": outcome.matchmaking_s,
        "allreduce_s": outcome.allreduce_s, "outer_step_s": work.outer_s, "bytes_sent": outcome.bytes_sent,
        "bytes_received": outcome.bytes_received, "compression_ratio": 1.0 / engine.codec.expected_ratio(),
        "error": outcome.error, "attempts": work.attempts, "inner_steps": work.inner.steps,
        "blocked_s": work.blocked_s, "overlapped": overlapped,
    }
    evaluated = {"eval_loss": eval_loss} if math.isfinite(eval_loss) else {}  # (fragments: not every round)
    engine.board.update(outer_step=engine.outer_step, **evaluated, last_round=last_round,
                        last_round_time=round_time, rss_bytes=rss_bytes(),
                        cuda_allocated_bytes=torch.cuda.memory_allocated() if engine.device.type == "cuda" else None)
    summary = {
        "peer_id": engine.transport.peer_id, "outer_step": step, "ok": outcome.ok,
        "train_loss": work.inner.mean_loss, "eval_loss": eval_loss, "peers": max(1, outcome.group_size),
        "samples_per_second": engine._last_sps, "bytes_sent": outcome.bytes_sent,
        "bytes_received": outcome.bytes_received, "round_time": round_time, "sync_s": work.sync_s,
        "compute_s": work.compute_s, "blocked_s": work.blocked_s, "overlapped": overlapped,
        "barrier_s": work.barrier_s, "matchmaking_s": outcome.matchmaking_s, "allreduce_s": outcome.allreduce_s,
        "outer_step_s": work.outer_s, "landed_after_steps": work.landed_after,
        "fragment": engine.parts.index(work.index) if len(engine.parts) > 1 else 0, "fragments": len(engine.parts),
        "digest": digest, "error": outcome.error, "fp32_bytes": 4 * sum(p.numel() for p in engine.global_params),
        "initial_eval_loss": engine.initial_eval_loss, "attempts": work.attempts, "inner_steps": work.inner.steps,
        "samples": work.inner.samples, "adopted": False, "retried": work.retried,
        "sent_norm": work.sent_norm, "update_norm": work.update_norm, "clipped": list(outcome.clipped),
        "capped": list(outcome.capped), "rejected": sorted(work.rejected), "excluded": engine.membership.excluded_peers(),
    }
    engine.board.round_done(summary)
    if outcome.ok:
        engine.checkpoint_if_due()
    return RoundReport.of(summary)


def run_round(engine, inner) -> RoundReport:
    """A blocking outer round for ``engine``'s current outer step (``inner``: what its inner steps did): the
    training loop waits for it; on commit the model (the round's parameters) := the new global params."""
    t = time.perf_counter()
    work = prepare(engine, inner, engine.round_parts())
    exchange(engine, work)
    if work.behind is not None:  # a heavier lineage is ready: adopt its state, drop this round's inner work
        return engine._catch_up_instead_of_round(work.behind, inner, work.t0)
    eval_loss = float("nan")
    if work.outcome.ok:
        engine._copy_global_into_model(work.index, keep_rest=True)
        engine._samples_since_sync -= work.weight
        eval_loss = engine._evaluate_global()
    work.blocked_s = time.perf_counter() - t
    return finish(engine, work, eval_loss)


def _commit(engine, work: RoundWork, feedback: list[torch.Tensor] | None) -> None:
    """The outer step and the certificate of a committed round, and the error feedback's residuals, together
    under the engine's lock (a checkpoint or a state download sees all of it or none)."""
    outcome = work.outcome
    with engine._lock:
        if feedback is not None:
            for i, sent, decoded in zip(work.index, work.to_send, feedback):
                engine.error_feedback.update(i, sent, decoded)
        parent = engine.digest
        apply_outer_step(engine.outer_opt, [engine.global_params[i] for i in work.index],
                         [engine._averaged[i] for i in work.index])
        engine.outer_step += 1
        engine.digest = work.digest = params_digest(engine.global_params)
        engine._certify(outcome, engine.outer_step - 1, parent, engine.digest)
    engine._mates = set(outcome.gathered)
    engine.sync.committed(engine.outer_step - 1, work.attempts - 1)
    engine.board.add(rounds_ok=1)
    for peer_id in outcome.clipped:
        engine.board.event("contribution_clipped", f"outer step {engine.outer_step - 1}: the update of peer "
                           f"{peer_id[-8:]} was far above the group's median and was clipped")
    for peer_id in outcome.capped:
        engine.board.event("contribution_clipped", f"outer step {engine.outer_step - 1}: peer {peer_id[-8:]} "
                           "claimed far more samples than the group's median; its weight was capped")


__all__ = ["RoundReport", "RoundWork", "exchange", "finish", "norm", "prepare", "pseudo_gradient", "run_round"]
