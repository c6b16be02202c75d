"""The peer process: inner training, sync rounds, outer steps, checkpoints, status.

State a peer keeps (DiLoCo, arXiv:2311.08105):

* ``global_params``: the last agreed model, fp32 on the CPU, identical bit for bit on every peer that
  took part in the same rounds; the outer optimizer (Nesterov momentum) steps on them.
* the local model on the training device (CUDA if present) with its AdamW state, which stays local.

One outer step: H inner steps -> pseudo-gradient ``global - local`` -> averaged over the round's
peers (weighted by samples) -> outer step on ``global_params`` -> local model := global params.
A failed round is re-run at once among the survivors (:mod:`swarmloco.node.sync`); if it still
fails, nothing global changes: the local model keeps its inner progress and the next round's
pseudo-gradient carries it. A peer behind the swarm (late join, restart, failed round while its group
committed, woken from SIGSTOP) adopts the swarm's state (:mod:`swarmloco.node.peer_state`) and
drops its unfinished inner work: the local model restarts from the adopted global parameters.

Rounds start after ``inner.steps`` inner steps, or, with ``outer.target_samples``, as soon as the
live peers at this outer step processed that many samples together (tracked in their heartbeats).
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from swarmloco.compression import get_codec
from swarmloco.compression.error_feedback import error_feedback_for
from swarmloco.config import RunConfig
from swarmloco.node.data import Corpus, shard_for_peer
from swarmloco.node.inner_loop import InnerTrainer, evaluate
from swarmloco.node.membership import REFRESH_BEATS, Membership
from swarmloco.node.model import GPT, num_params
from swarmloco.node.peer_state import PeerState
from swarmloco.node.state_sync import DIGEST_CHARS, params_digest
from swarmloco.node.status import StatusBoard
from swarmloco.node.sync import READY_STATES, Synchronizer
from swarmloco.outer_optim import apply_outer_step, build_outer_optimizer
from swarmloco.protocol import faults
from swarmloco.protocol.identity import Identity
from swarmloco.protocol.manifest import RunManifest
from swarmloco.protocol.progress import PeerProgress, ProgressTracker
from swarmloco.protocol.transport import Transport

logger = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass
class PeerOptions:
    """Per-process choices that are not part of the config file."""

    shard: int | None = None
    device: str = "auto"
    max_outer_steps: int | None = None
    resume: bool = False
    inner_steps: int | None = None
    extra_status: dict[str, Any] = field(default_factory=dict)


class Peer(PeerState):
    """One swarm member. Build with a started transport; call :meth:`run`."""

    def __init__(self, cfg: RunConfig, transport: Transport, options: PeerOptions | None = None,
                 board: StatusBoard | None = None, stop: threading.Event | None = None,
                 corpus: Corpus | None = None, identity: Identity | None = None):
        """``identity``: the key p2pd runs with (it signs our records); fresh if None, for transports that
        take any peer id (tests)."""
        self.cfg, self.transport = cfg, transport
        self.identity = identity or Identity.generate()
        if identity is not None and identity.libp2p_peer_id() != transport.peer_id:
            raise ValueError(f"identity {identity.libp2p_peer_id()} is not the transport's peer id {transport.peer_id}")
        self.options = options or PeerOptions()
        self.board = board or StatusBoard()
        self.stop = stop or threading.Event()
        self.manifest = RunManifest.from_config(cfg)
        self.device = pick_device(self.options.device)
        self.H = self.options.inner_steps or cfg.inner.steps

        self.model = GPT(cfg.model, seed=cfg.seed).to(self.device)
        # on CUDA, the CPU side of every host<->device copy is pinned, so the copies are asynchronous DMA
        pin = self.device.type == "cuda"
        self.global_params = [_cpu_buffer(p, pin).copy_(p.detach()) for p in self.model.parameters()]
        self._staging = [_cpu_buffer(p, pin) for p in self.model.parameters()]  # the local params, copied off
        self.outer_opt = build_outer_optimizer(self.global_params, cfg.outer)  # the simulator's update rule too
        self.inner = InnerTrainer(self.model, cfg.inner, self.device)
        self.outer_step = 0

        self.corpus = corpus or Corpus(cfg.data, cfg.model.block_size, cfg.seed)
        self.shard = self.options.shard if self.options.shard is not None else shard_for_peer(
            transport.peer_id, cfg.data.num_shards)
        self.batches = self.corpus.train_batches(self.shard, stream_seed=0)
        self.eval_set = self.corpus.eval_batches()

        self.membership = Membership(self.manifest, transport, self.identity, cfg.swarm, self.board)
        self.tracker = ProgressTracker(transport, self.manifest.progress_key, cfg.swarm.heartbeat_ttl, self.identity,
                                       admits=self.membership.admits)
        self.sync = Synchronizer(transport, self.tracker, cfg.swarm, heartbeat=self._progress, stop=self.stop,
                                 refused=lambda peer_id: self.membership.refused(peer_id, self.outer_step))
        self.codec = get_codec(cfg.codec)
        self.error_feedback = error_feedback_for(cfg.codec, self.codec)  # topk: decays (SparseLoCo's momentum)
        self._pseudo = [torch.zeros_like(p) for p in self.global_params]
        self._averaged = [torch.zeros_like(p) for p in self.global_params]
        self._samples_since_sync = 0
        self._last_sps = 0.0
        self._last_round_bytes: int | None = None
        self._known_peers: set[str] = set()
        self._maddrs = tuple(transport.visible_maddrs()[:4])  # asked once: each call is an RPC to the DHT process
        self._state = "joining"
        self._heartbeat_thread: threading.Thread | None = None
        self._lock = threading.Lock()  # global params, momentum and outer step change together under it
        self.digest = params_digest(self.global_params)
        self._behind = threading.Event()  # the heartbeat saw the swarm ahead: stop inner steps, catch up
        self._round_due = threading.Event()  # target_samples mode: the swarm has done enough samples
        self._swarm_samples = 0
        self._attempt = 0  # which try of the current round (heartbeats say it)
        transport.set_state_provider(self._serve_state)
        self._step_delay = faults.inner_step_delay()  # injected slowness (tests); 0 normally
        self.board.update(
            peer_id=transport.peer_id, run_id=self.manifest.run_id, manifest_hash=self.manifest.hash,
            device=str(self.device), inner_steps_per_round=self.H, shard=self.shard, outer_step=0, inner_step=0,
            num_params=num_params(self.model), codec=self.codec.info.name, **self.options.extra_status,
        )

    # ----- swarm membership ---------------------------------------------------------------------
    def _progress(self) -> PeerProgress:
        return PeerProgress(
            peer_id=self.transport.peer_id, outer_step=self.outer_step, state=self._state, time=time.time(),
            samples=self._samples_since_sync, samples_per_second=self._last_sps,
            maddrs=self._maddrs,
            round_time=self.board.get("last_round_time"),
            bytes_per_round=self._last_round_bytes,
            digest=self.digest[:DIGEST_CHARS], attempt=self._attempt,
        )

    def announce(self) -> None:
        """Check our manifest (ManifestMismatch) and access token (AccessRefused) against the swarm's, then
        publish our manifest and first heartbeat."""
        self.membership.announce(wait_s=min(10.0, self.cfg.swarm.ready_timeout))
        self.tracker.publish(self._progress())

    def _heartbeat_loop(self) -> None:
        beats = 0
        while not self.stop.wait(self.cfg.swarm.heartbeat_period):
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
            self.board.update(peers_online=len(peers), swarm=[p.to_dict() for p in peers])
            self._note_membership({p.peer_id for p in peers} - {self.transport.peer_id})
            self._check_swarm(peers)

    def _check_swarm(self, peers: list[PeerProgress]) -> None:
        """While training: stop early if the swarm is ahead of us, or (target_samples) the round is due."""
        step, state = self.outer_step, self._state
        if state != "training":
            return
        if self.sync.behind(peers, step, self.digest) is not None and self.outer_step == step:
            self._behind.set()
        if self.cfg.outer.target_samples:
            now, me = time.time(), self.transport.peer_id
            others = [p for p in self.sync.live(peers) if p.peer_id != me and p.outer_step == step]
            total = sum(p.samples + (p.samples_per_second * max(0.0, now - p.time) if p.state == "training" else 0)
                        for p in others)
            if self.outer_step != step:  # the round ended while we looked: these counts are stale
                return
            self._swarm_samples = int(total)
            if any(p.state in READY_STATES for p in others) or total + self._samples_since_sync >= self.cfg.outer.target_samples:
                self._round_due.set()  # someone saw the target reached, or we do: join the round now

    def _note_membership(self, others: set[str]) -> None:
        for peer_id in sorted(others - self._known_peers):
            self.board.event("peer_joined", f"peer {peer_id[-8:]} joined")
        for peer_id in sorted(self._known_peers - others):
            self.board.event("peer_left", f"peer {peer_id[-8:]} left (no heartbeat for {self.cfg.swarm.heartbeat_ttl:.0f}s)")
        self._known_peers = others

    def _set_state(self, state: str) -> None:
        self._state = state
        self.board.update(state=state)

    # ----- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        """Train until max_outer_steps or stop; returns the number of outer steps this run took."""
        self.maybe_resume()
        self.announce()
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._heartbeat_thread.start()
        target = self.sync.behind(self.tracker.fetch(), self.outer_step, self.digest)
        if target is not None:  # late joiner, or a restart older than the swarm
            logger.info("the swarm is at outer step %d, this peer at %d: downloading its state",
                        target.outer_step, self.outer_step)
            self.catch_up(target)
        start_step = self.outer_step
        initial_eval = evaluate(self.model, self.eval_set, self.device)
        self.initial_eval_loss = initial_eval
        self.board.update(eval_loss=initial_eval, initial_eval_loss=initial_eval)
        logger.info("peer %s: %d params, shard %d, device %s, manifest %s, initial eval loss %.4f",
                    self.transport.peer_id[-8:], num_params(self.model), self.shard, self.device,
                    self.manifest.short, initial_eval)
        try:
            while not self.stop.is_set():
                if self.options.max_outer_steps is not None and self.outer_step - start_step >= self.options.max_outer_steps:
                    break
                self.one_outer_step()
        finally:
            self._set_state("stopped")
            self.stop.set()
            self.tracker.publish(self._progress())
            self.write_checkpoint()
        return self.outer_step - start_step

    def _should_stop_training(self) -> bool:
        if self.stop.is_set() or self._behind.is_set() or self._round_due.is_set():
            return True
        target = self.cfg.outer.target_samples
        return bool(target) and self._samples_since_sync + self._swarm_samples >= target

    def _count_samples(self, step: int) -> None:
        self._samples_since_sync += self.cfg.data.batch_size
        if self._step_delay:
            self.stop.wait(self._step_delay)
        self.board.update(inner_step=step)

    @torch.no_grad()
    def _pseudo_gradient(self) -> list[torch.Tensor]:
        """``global - local`` in fp32 on the CPU, into ``self._pseudo`` (one device sync for all tensors)."""
        for st, p in zip(self._staging, self.model.parameters()):
            st.copy_(p.detach(), non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for buf, g, st in zip(self._pseudo, self.global_params, self._staging):
            torch.sub(g, st, out=buf)
        return self._pseudo

    def one_outer_step(self) -> None:
        t0 = time.perf_counter()
        self._behind.clear()
        self._round_due.clear()
        self._swarm_samples = 0  # the others' count for this step comes with their next heartbeats
        self._set_state("training")
        self.tracker.publish(self._progress())
        max_steps = self.H if not self.cfg.outer.target_samples else 1 << 40  # the swarm's samples end it
        result = self.inner.train(self.batches, max_steps, should_stop=self._should_stop_training,
                                  on_step=self._count_samples)
        if result.seconds > 0 and result.steps:
            self._last_sps = result.samples / result.seconds
        self.board.update(inner_steps_total=self.inner.step_count, train_loss=result.mean_loss,
                          samples_per_second=self._last_sps)
        if self.stop.is_set():
            return
        compute_s = time.perf_counter() - t0

        self._pseudo_gradient()
        finite = all(bool(torch.isfinite(b).all()) for b in self._pseudo)
        if not finite:
            raise FloatingPointError("pseudo-gradient holds NaN/Inf: the local model diverged")
        to_send = self._pseudo
        if self.error_feedback is not None:  # what compression drops now is added to the next round's
            to_send = [self.error_feedback.compensate(i, g) for i, g in enumerate(self._pseudo)]

        to_send = faults.poison(to_send)  # a hostile peer, in tests only (SWARMLOCO_FAULT)
        self._set_state("ready")
        t1 = time.perf_counter()
        attempt, barrier_s, retried, rejected = 0, 0.0, [], set()
        while True:
            self._attempt = attempt
            handle, barrier = self.sync.start(self.outer_step, to_send, self._averaged,
                                              faults.poison_weight(self._samples_since_sync), attempt)
            barrier_s += barrier.waited_s
            if handle is None:  # the swarm is ahead of us: adopt its state, drop this round's inner work
                self._catch_up_instead_of_round(barrier.behind, result, t0)
                return
            logger.info("outer step %d: %d peer(s) ready after %.1fs%s%s", self.outer_step, len(barrier.ready),
                        barrier.waited_s, " (timed out)" if barrier.timed_out else "",
                        f" (re-run {attempt})" if attempt else "")
            self._set_state("averaging")
            outcome = self.sync.decide(handle.result(), self.outer_step)
            rejected.update(outcome.rejected)
            if outcome.ok or len(barrier.ready) <= 1 or attempt >= self.cfg.swarm.round_retries or self.stop.is_set():
                break
            self.sync.note_failure(outcome)
            self.membership.note_round(outcome, self.outer_step)  # rejected peers: not in the re-run either
            retried.append(outcome.error)
            attempt += 1
            self.board.add(rounds_retried=1)
            self.board.event("round_retry", f"outer step {self.outer_step}: {outcome.error}; re-running it"
                             + (f" without {', '.join(s[-8:] for s in outcome.suspects)}" if outcome.suspects else ""))
            logger.warning("round for outer step %d failed (%s); re-running it among the survivors",
                           self.outer_step, outcome.error)
            self._set_state("ready")
        sync_s = time.perf_counter() - t1
        self._attempt = 0
        self.membership.note_round(outcome, self.outer_step)

        t2 = time.perf_counter()
        if outcome.ok and self.error_feedback is not None:  # keep what the codec did not carry
            for i, sent in enumerate(to_send):
                decoded = self.codec.roundtrip(sent)
                if outcome.group_size <= 1:  # alone: the update a group of one would average (the simulator's
                    self._averaged[i].copy_(decoded)  # rule), not the whole accumulator again every lone round
                self.error_feedback.update(i, sent, decoded)
        sent_norm = _norm(to_send)  # what this peer contributed, and the group's average it applies
        update_norm = _norm(self._averaged) if outcome.ok else float("nan")
        if outcome.ok:
            with self._lock:
                apply_outer_step(self.outer_opt, self.global_params, self._averaged)
                self.outer_step += 1
                self.digest = params_digest(self.global_params)
            self.sync.committed(self.outer_step - 1, attempt)
            self._copy_global_into_model()
            self._samples_since_sync = 0
            self.board.add(rounds_ok=1)
            for peer_id in outcome.clipped:
                self.board.event("contribution_clipped", f"outer step {self.outer_step - 1}: the update of peer "
                                 f"{peer_id[-8:]} was far above the group's median and was clipped")
            for peer_id in outcome.capped:
                self.board.event("contribution_clipped", f"outer step {self.outer_step - 1}: peer {peer_id[-8:]} "
                                 "claimed far more samples than the group's median; its weight was capped")
        else:
            self.board.add(rounds_failed=1)
            self.board.event("round_failed", f"outer step {self.outer_step}: {outcome.error}")
            logger.warning("round for outer step %d failed: %s", self.outer_step, outcome.error)
        outer_s = time.perf_counter() - t2

        eval_loss = evaluate(self.model, self.eval_set, self.device) if outcome.ok else float("nan")
        round_time = time.perf_counter() - t0
        self.board.add(bytes_sent_total=outcome.bytes_sent, bytes_received_total=outcome.bytes_received)
        self._last_round_bytes = outcome.bytes_sent + outcome.bytes_received
        fp32_bytes = 4 * sum(p.numel() for p in self.global_params)
        last_round = {
            "outer_step": self.outer_step, "ok": outcome.ok, "peers": max(1, outcome.group_size),
            "compute_s": compute_s, "barrier_s": barrier_s, "matchmaking_s": outcome.matchmaking_s,
            "allreduce_s": outcome.allreduce_s, "outer_step_s": outer_s, "bytes_sent": outcome.bytes_sent,
            "bytes_received": outcome.bytes_received, "compression_ratio": 1.0 / self.codec.expected_ratio(),
            "error": outcome.error, "attempts": attempt + 1, "inner_steps": result.steps,
        }
        self.board.update(outer_step=self.outer_step, eval_loss=eval_loss, last_round=last_round,
                          last_round_time=round_time, rss_bytes=_rss_bytes(),
                          cuda_allocated_bytes=torch.cuda.memory_allocated() if self.device.type == "cuda" else None)
        self.board.round_done({
            "peer_id": self.transport.peer_id, "outer_step": self.outer_step, "ok": outcome.ok,
            "train_loss": result.mean_loss, "eval_loss": eval_loss, "peers": max(1, outcome.group_size),
            "samples_per_second": self._last_sps, "bytes_sent": outcome.bytes_sent,
            "bytes_received": outcome.bytes_received, "round_time": round_time, "sync_s": sync_s,
            "digest": self.digest, "error": outcome.error, "fp32_bytes": fp32_bytes,
            "initial_eval_loss": self.initial_eval_loss, "attempts": attempt + 1, "inner_steps": result.steps,
            "samples": result.samples, "adopted": False, "retried": retried,
            "sent_norm": sent_norm, "update_norm": update_norm, "clipped": list(outcome.clipped),
            "capped": list(outcome.capped),
            "rejected": sorted(rejected), "excluded": self.membership.excluded_peers(),
        })
        if outcome.ok:
            self.checkpoint_if_due()


def _norm(tensors: list[torch.Tensor]) -> float:
    """L2 norm of a list of tensors taken as one vector."""
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))) \
        if tensors else 0.0


def _cpu_buffer(like: torch.Tensor, pin: bool) -> torch.Tensor:
    """An fp32 CPU tensor shaped like ``like`` (page-locked when ``pin``)."""
    return torch.empty(like.shape, dtype=torch.float32, pin_memory=pin)


def _rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


__all__ = ["Peer", "PeerOptions", "params_digest", "pick_device"]
