"""A peer's state: its lineage, checkpoints, serving it to others, and adopting a heavier lineage.

A mixin of :class:`swarmloco.node.diloco.DiLoCo` (it uses the engine's model, global parameters, outer
optimizer, chain, transport and status board). A peer whose lineage the swarm outweighs (late join,
restart, a failed round while its group committed, woken from SIGSTOP, a loner, the lighter side of a
partition) adopts the heavier one, proven and downloaded by :mod:`swarmloco.node.catch_up`, and drops
its unfinished inner work: the local model restarts from the adopted global parameters. What its own
lineage held since the fork is dropped too, in one logged line (DiLoCo survives dropped contributions;
folding a far-off state into the next round as one more pseudo-gradient would move the model by the
whole distance between the forks).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from swarmloco.node.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from swarmloco.node.lineage import Chain
from swarmloco.node.state_sync import pack_state, params_digest
from swarmloco.protocol.certificates import CertificateError, RoundHeader, sign_round
from swarmloco.protocol.identity import peer_id_of_public_key, public_key_of_peer_id
from swarmloco.protocol.progress import PeerProgress

logger = logging.getLogger(__name__)


class PeerState:
    """Checkpoints, state serving and catching up, for :class:`~swarmloco.node.diloco.DiLoCo`."""

    def _copy_global_into_model(self, index=None, keep_rest: bool = False) -> None:
        """The model's parameters (those of ``index``, default all) := the global parameters; ``keep_rest``
        with error feedback's rest in the model (``rotate``, ``hadtopk``): minus what the last round did not send."""
        params = list(self.model.parameters())
        ef = self.error_feedback if keep_rest and self._rest_in_model else None
        with torch.no_grad():
            for i in range(len(params)) if index is None else index:
                rest = ef.rest(i) if ef is not None else None
                if rest is None:
                    params[i].copy_(self.global_params[i], non_blocking=True)  # from pinned memory on CUDA: async
                else:  # (the simulator's landing: the same fp32 operation)
                    params[i].copy_(self.global_params[i] - rest)
        self._sync_device()  # the outer step may rewrite the source buffers next

    @property
    def _rest_in_model(self) -> bool:
        """Whether the model holds, besides the global parameters, what the last round did not send (rotate,
        hadtopk)."""
        return self.error_feedback is not None and self.error_feedback.in_model

    def _sync_device(self) -> None:
        """Wait for the asynchronous copies between pinned CPU buffers and the device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _evaluate_global(self, step: int | None = None) -> float:
        """``evaluate()`` of the global parameters after a committed round: every round, or with streaming
        fragments once every ``fragments`` rounds (when each fragment took one more step: a round moves only
        one fragment, and an evaluation per round would cost F times as much), NaN for the rounds between.
        With rounds overlapped (or the unsent rest kept in the model) the model holds this peer's own parameters:
        they are set aside on the device, the global ones put in for the evaluation, and restored. ``step``: the
        outer step the landing round committed (default: the peer's; rounds in flight after it may be ahead)."""
        if self.evaluate_fn is None or (self.outer_step if step is None else step) % self.outer_cfg.fragments:
            return float("nan")
        if not self.overlapped and not self._rest_in_model:
            return self._evaluate()
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.model.parameters()]
            self._copy_global_into_model()
        try:
            return self._evaluate()
        finally:
            with torch.no_grad():
                for p, s in zip(self.model.parameters(), saved):
                    p.copy_(s)

    def load_state(self, state: dict[str, Any]) -> None:
        """Adopt a checkpoint (or a downloaded state) as this peer's global state."""
        self.model.load_state_dict(state["model"])
        with torch.no_grad():  # the global copy from the saved fp32 values, not from the model's dtype
            for g, (name, p) in zip(self.global_params, self.model.named_parameters()):
                g.copy_(state["model"].get(name, p).detach().cpu().float())
        self.outer_opt.load_state_dict(state["outer_optimizer"])
        if state.get("inner_optimizer"):
            try:
                self.inner_optimizer.load_state_dict(state["inner_optimizer"])
            except (ValueError, KeyError) as e:
                logger.warning("ignoring the checkpoint's inner optimizer state: %s", e)
        if state.get("error_feedback") and self.error_feedback is not None:
            self.error_feedback.load_state_dict(state["error_feedback"])
            if self._rest_in_model:  # the model as it was: the global params minus the unsent rest
                if all(isinstance(k, int) and 0 <= k < len(self.global_params)
                       and r.shape == self.global_params[k].shape for k, r in self.error_feedback.residuals.items()):
                    self._copy_global_into_model(keep_rest=True)
                else:
                    logger.warning("ignoring the checkpoint's error feedback: it does not fit this model")
                    self.error_feedback.reset()
        self.outer_step = int(state["outer_step"])
        self.inner_step = max(self.inner_step, self.outer_step * self.steps_per_round)
        self.digest = params_digest(self.global_params)
        self.chain.reset(self.outer_step, bytes.fromhex(self.digest))
        try:
            saved = Chain.from_state(self.manifest.hash, state["lineage"]) if state.get("lineage") else None
            if saved is not None and (saved.tip_step, saved.tip_digest.hex()) != (self.outer_step, self.digest):
                raise CertificateError("it ends elsewhere than the saved parameters")
        except CertificateError as e:
            logger.warning("the checkpoint's lineage is unusable (%s): this peer's chain starts at its outer step %d",
                           e, self.outer_step)
            saved = None
        if saved is not None:
            self.chain.reset(saved.root_step, saved.root_digest, saved.certs)
        self.push_lineage(0)
        self.board.update(outer_step=self.outer_step)

    def push_lineage(self, start: int) -> None:
        """Hand the averager process our chain from certificate ``start`` on (it serves it as proof)."""
        entries = [(c.digest, c.encode()) for c in self.chain.certs[start:]]
        self.transport.set_lineage(self.chain.root_step, self.chain.root_digest, start, entries)

    def _chain_snapshot(self) -> Chain:
        with self._lock:
            return Chain(self.chain.manifest, self.chain.root_step, self.chain.root_digest, list(self.chain.certs))

    # ----- lineage ----------------------------------------------------------------------------
    def _counts(self, public_key: bytes) -> bool:
        """Whether a certificate's signer counts as a contributor: admitted (private runs), not excluded."""
        return self.membership.admits(public_key) and not self.membership.refused(
            peer_id_of_public_key(public_key), self.outer_step)

    def _behind_check(self, peers: list[PeerProgress], mates_only: bool) -> tuple[object, bool]:
        """For the barrier: a prepared adoption, and whether a verdict on a recent mate's claim is due."""
        self.catchup.offer(peers)
        among = self._mates if self.sync.rounds_joined else {p.peer_id for p in peers}
        return self.catchup.pending, self.catchup.unjudged(peers, among)

    def _collect_signatures(self, peers: list[PeerProgress]) -> None:
        """Add group mates' signatures of rounds we hold (from their heartbeats) to our certificates."""
        first = None
        with self._lock:
            for p in peers:
                if not p.attest or p.peer_id == self.transport.peer_id:
                    continue
                public = public_key_of_peer_id(p.peer_id)
                for step, sig in p.attest:
                    if public is not None and self.chain.add_signature(step, public, sig):
                        i = step - self.chain.root_step
                        first = i if first is None else min(first, i)
            if first is not None:
                self.push_lineage(first)

    def _certify(self, outcome, step: int, parent: str, digest: str) -> None:
        """Sign the round we just committed and append its certificate to our chain (under the lock)."""
        members = tuple(sorted({k for k in (public_key_of_peer_id(pid) for pid in outcome.gathered) if k}
                               | {self.identity.public_bytes}))
        samples = sum(max(0, int(m.get("samples", 0))) for m in outcome.gathered.values()
                      if isinstance(m.get("samples", 0), int))
        header = RoundHeader(manifest=self.manifest.hash, step=step, parent=bytes.fromhex(parent),
                             digest=bytes.fromhex(digest), members=members, samples=min(samples, 1 << 61))
        cert = sign_round(header, self.identity)
        self.chain.append(cert)
        self._attest.append((step, cert.sigs[0][1]))
        self.push_lineage(len(self.chain.certs) - 1)

    def _state_dict(self) -> dict[str, Any]:
        """The checkpoint: the model's state dict holding the global parameters (the model is not touched)."""
        with self._lock:
            by_id = {id(p): g for p, g in zip(self.model.parameters(), self.global_params)}
            model = {k: by_id.get(id(v), v.detach()).cpu().clone()
                     for k, v in self.model.state_dict(keep_vars=True).items()}
            return {
                "outer_step": self.outer_step,
                "manifest_hash": self.manifest.hash,
                "model": model,
                "outer_optimizer": self.outer_opt.state_dict(),
                "inner_optimizer": self.inner_optimizer.state_dict(),
                "error_feedback": self.error_feedback.state_dict() if self.error_feedback is not None else None,
                "lineage": Chain(self.chain.manifest, self.chain.root_step, self.chain.root_digest,
                                 self.chain.certs).to_state(),
            }

    def _serve_state(self) -> tuple[dict, list[torch.Tensor]]:
        """What a peer downloading our state gets (runs in hivemind's fetch thread: a consistent copy)."""
        with self._lock:
            momentum = [self.outer_opt.state.get(g, {}).get("momentum_buffer") for g in self.global_params]
            return pack_state(self.global_params, momentum, self.outer_step, self.manifest.hash, self.digest)

    def adopt(self, pending) -> None:
        """Take a proven heavier lineage and its downloaded state (a :class:`~swarmloco.node.catch_up.Pending`);
        this peer's unfinished inner work and its own rounds since the fork are dropped."""
        state, comparison = pending.state, pending.comparison
        with self._lock:
            for g, p in zip(self.global_params, state.params):
                g.copy_(p)
            self.outer_opt.state.clear()
            if state.momentum is not None:
                for g, m in zip(self.global_params, state.momentum):
                    self.outer_opt.state[g]["momentum_buffer"] = m.clone()
            self.outer_step, self.digest = state.outer_step, state.digest
            fork_index = max(0, min(comparison.fork, self.chain.tip_step) - self.chain.root_step)
            self.chain.adopt(pending.chain)
            self.push_lineage(min(fork_index, len(self.chain.certs)))
        self.catchup.forget()
        self._copy_global_into_model()  # unfinished inner work is dropped: restart from the adopted params
        if self._rest_in_model:
            self.error_feedback.reset()  # (the rest it kept went with the model's inner work)
        self._samples_since_sync = 0
        self.inner_step = max(self.inner_step, state.outer_step * self.steps_per_round)  # the LR schedule's position
        dropped = comparison.dropped_rounds
        line = (f"adopted outer step {state.outer_step} from {pending.who} ({pending.bytes / 1e6:.2f} MB in "
                f"{pending.seconds:.3f}s): its lineage since outer step {comparison.fork} has "
                f"{comparison.theirs.brief()}, ours {comparison.mine.brief()}")
        if dropped > 0:
            line += f"; this peer's {dropped} round(s) since the fork are dropped"
        (logger.warning if dropped > 0 else logger.info)("%s", line)
        self.board.add(state_downloads=1, state_bytes_received=pending.bytes)
        self.board.event("state_downloaded", line)
        self.board.update(outer_step=state.outer_step)

    def maybe_resume(self) -> None:
        if not self.checkpoint_cfg.dir:
            return
        state = latest_checkpoint(self.checkpoint_cfg.dir, self.manifest.hash)
        if state is None:
            logger.info("no checkpoint to resume from in %s; starting at outer step 0", self.checkpoint_cfg.dir)
            return
        self.load_state(state)
        self.board.event("checkpoint", f"resumed from outer step {self.outer_step}")

    def checkpoint_if_due(self) -> None:
        """Write a checkpoint every ``checkpoint.every`` outer steps (when a directory is configured)."""
        if self.checkpoint_cfg.dir and self.outer_step % self.checkpoint_cfg.every == 0:
            self.write_checkpoint()

    def write_checkpoint(self) -> None:
        if not self.checkpoint_cfg.dir:
            return
        try:
            path = save_checkpoint(self.checkpoint_cfg.dir, self._state_dict(), keep=self.checkpoint_cfg.keep)
        except CheckpointError as e:  # a full disk is survived: training goes on
            logger.error("%s", e)
            self.board.event("checkpoint", f"FAILED: {e}")
            return
        self.board.event("checkpoint", f"wrote {path}")

    def _catch_up_instead_of_round(self, pending, inner, t0: float, taken=None):
        """Adopt the prepared heavier lineage instead of (or before) a round; its report (a RoundReport).
        ``taken``: the adoption already taken from the catch-up (else it is taken here)."""
        from swarmloco.node.round import RoundReport

        pending = taken if taken is not None else self.catchup.take(self._chain_snapshot())
        ok = pending is not None
        if ok:
            self.adopt(pending)
        eval_loss = self._evaluate() if ok else float("nan")
        self.board.update(outer_step=self.outer_step, eval_loss=eval_loss)
        summary = {
            "peer_id": self.transport.peer_id, "outer_step": self.outer_step, "ok": ok, "adopted": True,
            "train_loss": inner.mean_loss, "eval_loss": eval_loss, "peers": 1, "samples_per_second": self._last_sps,
            "bytes_sent": 0, "bytes_received": 0, "round_time": time.perf_counter() - t0, "sync_s": 0.0,
            "digest": self.digest, "error": None if ok else "the prepared adoption no longer outweighs this peer's lineage",
            "fp32_bytes": 4 * sum(p.numel() for p in self.global_params), "initial_eval_loss": self.initial_eval_loss,
            "attempts": 0, "inner_steps": inner.steps, "samples": inner.samples, "clipped": [], "capped": [],
            "rejected": [], "excluded": self.membership.excluded_peers(),
        }
        self.board.round_done(summary)
        if ok:
            self.checkpoint_if_due()  # an adopted state is as good a restart point as a committed one
        return RoundReport.of(summary)
