"""One outer round of a :class:`~swarmloco.node.diloco.DiLoCo` peer, from its pseudo-gradient to its report.

pseudo-gradient ``global - local`` (fp32 on the CPU; with a lossy codec plus the error-feedback residual)
-> ready barrier, averaging, commit decision, re-runs (:mod:`swarmloco.node.sync`) -> on commit: error
feedback, the outer step, the certificate, the model := global params -> the report (status board,
``--json-events``, checkpoint). A barrier that finds a heavier lineage ready ends the round in an adoption
instead (this peer's inner work since its last round is dropped).
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from swarmloco.node.state_sync import params_digest
from swarmloco.outer_optim import apply_outer_step
from swarmloco.protocol import faults
from swarmloco.protocol.transport import TransportDied

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
    """L2 norm of a list of tensors taken as one vector."""
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))) \
        if tensors else 0.0


@torch.no_grad()
def pseudo_gradient(engine) -> list[torch.Tensor]:
    """``global - local`` in fp32 on the CPU, into ``engine._pseudo`` (one device sync for all tensors)."""
    for st, p in zip(engine._staging, engine.model.parameters()):
        st.copy_(p.detach(), non_blocking=True)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    for buf, g, st in zip(engine._pseudo, engine.global_params, engine._staging):
        torch.sub(g, st, out=buf)
    return engine._pseudo


def run_round(engine, inner) -> RoundReport:
    """The outer round for ``engine``'s current outer step (``inner``: what its inner steps did)."""
    t0 = engine._round_started
    compute_s = time.perf_counter() - t0
    pseudo_gradient(engine)
    if not all(bool(torch.isfinite(b).all()) for b in engine._pseudo):
        raise FloatingPointError("pseudo-gradient holds NaN/Inf: the local model diverged")
    to_send = engine._pseudo
    if engine.error_feedback is not None:  # what compression drops now is added to the next round's
        to_send = [engine.error_feedback.compensate(i, g) for i, g in enumerate(engine._pseudo)]
    to_send = faults.poison(to_send)  # a hostile peer, in tests only (SWARMLOCO_FAULT)

    dead = engine.transport.dead()
    if dead:  # no round can ever succeed: say so instead of failing every one of them
        raise TransportDied(f"{dead}: this peer can no longer average; restart it (--resume keeps its progress)")
    engine._set_state("ready")
    t1 = time.perf_counter()
    step, retries = engine.outer_step, engine.cfg_swarm.round_retries
    attempt, barrier_s, retried, rejected = 0, 0.0, [], set()
    while True:
        engine._attempt = attempt
        handle, barrier = engine.sync.start(step, to_send, engine._averaged,
                                            faults.poison_weight(engine._samples_since_sync), attempt)
        barrier_s += barrier.waited_s
        if handle is None:  # a heavier lineage is ready: adopt its state, drop this round's inner work
            engine._attempt, engine._rerun = 0, ""
            return engine._catch_up_instead_of_round(barrier.behind, inner, t0)
        engine._mates.update(barrier.ready)
        logger.info("outer step %d: %d peer(s) ready after %.1fs%s%s", step, len(barrier.ready), barrier.waited_s,
                    " (timed out)" if barrier.timed_out else "", f" (re-run {attempt})" if attempt else "")
        engine._set_state("averaging")
        outcome = engine.sync.wait(handle, step, attempt, barrier.ready)
        rejected.update(outcome.rejected)
        if outcome.ok or len(barrier.ready) <= 1 or attempt >= retries or engine.stop.is_set():
            break
        engine.sync.note_failure(outcome)
        engine.membership.note_round(outcome, step)  # rejected peers: not in the re-run either
        retried.append(outcome.error)
        attempt += 1
        # a group that decided not to commit leaves nobody stuck: its re-run must not make other groups of
        # this attempt give theirs up (their all-reduce may well commit; this peer then catches up)
        engine._rerun = "decided" if outcome.decided else "broken"
        engine.board.add(rounds_retried=1)
        engine.board.event("round_retry", f"outer step {step}: {outcome.error}; re-running it"
                           + (f" without {', '.join(s[-8:] for s in outcome.suspects)}" if outcome.suspects else ""))
        logger.warning("round for outer step %d failed (%s); re-running it among the survivors", step, outcome.error)
        engine._set_state("ready")
    sync_s = time.perf_counter() - t1
    engine._attempt, engine._rerun = 0, ""
    engine.membership.note_round(outcome, step)

    t2 = time.perf_counter()
    if outcome.ok and engine.error_feedback is not None:  # keep what the codec did not carry
        for i, sent in enumerate(to_send):
            decoded = engine.codec.roundtrip(sent)
            if outcome.group_size <= 1:  # alone: the update a group of one would average (the simulator's
                engine._averaged[i].copy_(decoded)  # rule), not the whole accumulator again every lone round
            engine.error_feedback.update(i, sent, decoded)
    sent_norm = norm(to_send)  # what this peer contributed, and the group's average it applies
    update_norm = norm(engine._averaged) if outcome.ok else float("nan")
    if outcome.ok:
        _commit(engine, outcome, attempt)
    else:
        engine.board.add(rounds_failed=1)
        engine.board.event("round_failed", f"outer step {step}: {outcome.error}")
        logger.warning("round for outer step %d failed: %s", step, outcome.error)
    outer_s = time.perf_counter() - t2

    eval_loss = engine._evaluate() if outcome.ok else float("nan")
    round_time = time.perf_counter() - t0
    engine.board.add(bytes_sent_total=outcome.bytes_sent, bytes_received_total=outcome.bytes_received)
    engine._last_round_bytes = outcome.bytes_sent + outcome.bytes_received
    last_round = {
        "outer_step": engine.outer_step, "ok": outcome.ok, "peers": max(1, outcome.group_size),
        "compute_s": compute_s, "barrier_s": barrier_s, "matchmaking_s": outcome.matchmaking_s,
        "allreduce_s": outcome.allreduce_s, "outer_step_s": outer_s, "bytes_sent": outcome.bytes_sent,
        "bytes_received": outcome.bytes_received, "compression_ratio": 1.0 / engine.codec.expected_ratio(),
        "error": outcome.error, "attempts": attempt + 1, "inner_steps": inner.steps,
    }
    engine.board.update(outer_step=engine.outer_step, eval_loss=eval_loss, last_round=last_round,
                        last_round_time=round_time, rss_bytes=rss_bytes(),
                        cuda_allocated_bytes=torch.cuda.memory_allocated() if engine.device.type == "cuda" else None)
    summary = {
        "peer_id": engine.transport.peer_id, "outer_step": engine.outer_step, "ok": outcome.ok,
        "train_loss": inner.mean_loss, "eval_loss": eval_loss, "peers": max(1, outcome.group_size),
        "samples_per_second": engine._last_sps, "bytes_sent": outcome.bytes_sent,
        "bytes_received": outcome.bytes_received, "round_time": round_time, "sync_s": sync_s,
        "digest": engine.digest, "error": outcome.error, "fp32_bytes": 4 * sum(p.numel() for p in engine.global_params),
        "initial_eval_loss": engine.initial_eval_loss, "attempts": attempt + 1, "inner_steps": inner.steps,
        "samples": inner.samples, "adopted": False, "retried": retried,
        "sent_norm": sent_norm, "update_norm": update_norm, "clipped": list(outcome.clipped),
        "capped": list(outcome.capped), "rejected": sorted(rejected), "excluded": engine.membership.excluded_peers(),
    }
    engine.board.round_done(summary)
    if outcome.ok:
        engine.checkpoint_if_due()
    return RoundReport.of(summary)


def _commit(engine, outcome, attempt: int) -> None:
    """The outer step and the certificate of a committed round; the model := global."""
    with engine._lock:
        parent = engine.digest
        apply_outer_step(engine.outer_opt, engine.global_params, engine._averaged)
        engine.outer_step += 1
        engine.digest = params_digest(engine.global_params)
        engine._certify(outcome, engine.outer_step - 1, parent, engine.digest)
    engine._mates = set(outcome.gathered)
    engine.sync.committed(engine.outer_step - 1, attempt)
    engine._copy_global_into_model()
    engine._samples_since_sync = 0
    engine.board.add(rounds_ok=1)
    for peer_id in outcome.clipped:
        engine.board.event("contribution_clipped", f"outer step {engine.outer_step - 1}: the update of peer "
                           f"{peer_id[-8:]} was far above the group's median and was clipped")
    for peer_id in outcome.capped:
        engine.board.event("contribution_clipped", f"outer step {engine.outer_step - 1}: peer {peer_id[-8:]} "
                           "claimed far more samples than the group's median; its weight was capped")


__all__ = ["RoundReport", "norm", "pseudo_gradient", "run_round"]
