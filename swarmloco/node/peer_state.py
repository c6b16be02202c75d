"""A peer's agreed state: global parameters, outer momentum, outer step, digest and the lineage certifying them.

They change together, under one lock, in three places only: a committed round (:meth:`PeerState.commit`), the
adoption of a heavier lineage (:meth:`PeerState.adopt`) and a checkpoint loaded (:meth:`PeerState.load`); so a
checkpoint or a state served to a joiner always holds a whole committed round.

A peer whose lineage the swarm outweighs (late join, restart, a failed round while its group committed, woken
from SIGSTOP, the lighter side of a partition) adopts the heavier one, proven and downloaded by
:mod:`swarmloco.node.catch_up`, and drops its unfinished inner work: the model restarts from the adopted global
parameters. Its own rounds since the fork are dropped too, in one logged line (folding a far-off state into the
next round as one more pseudo-gradient would move the model by the whole distance between the forks).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import torch

from swarmloco.config import CheckpointConfig
from swarmloco.node.buffers import RoundBuffers
from swarmloco.node.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from swarmloco.node.lineage import Chain
from swarmloco.node.phase import InnerPhase
from swarmloco.node.state_sync import pack_state, params_digest
from swarmloco.node.status import StatusBoard
from swarmloco.outer_optim import apply_outer_step
from swarmloco.protocol.certificates import CertificateError, RoundHeader, sign_round
from swarmloco.protocol.identity import public_key_of_peer_id
from swarmloco.protocol.progress import MAX_ATTEST, PeerProgress

logger = logging.getLogger(__name__)


class PeerState:
    """The agreed state of one peer and its checkpoints (see the module doc)."""

    def __init__(self, *, buffers: RoundBuffers, outer_opt: torch.optim.Optimizer, inner_optimizer, error_feedback,
                 manifest, identity, transport, board: StatusBoard, phase: InnerPhase, catchup,
                 checkpoint: CheckpointConfig):
        self.buffers, self.global_params = buffers, buffers.global_params
        self.outer_opt, self.inner_optimizer, self.error_feedback = outer_opt, inner_optimizer, error_feedback
        self.manifest, self.identity, self.transport, self.board = manifest, identity, transport, board
        self.phase, self.catchup, self.checkpoint_cfg = phase, catchup, checkpoint
        self.outer_step = 0
        self.digest = params_digest(self.global_params)
        self.chain = Chain(manifest.hash, 0, bytes.fromhex(self.digest))  # rooted at the run's genesis
        self.attest: deque[tuple[int, bytes]] = deque(maxlen=MAX_ATTEST)  # our signatures of recent rounds
        self.lock = threading.Lock()

    @property
    def rest_in_model(self) -> bool:
        """Whether the model holds, besides the global parameters, what the last round did not send."""
        return self.error_feedback is not None and self.error_feedback.in_model

    def restore_model(self, index=None, keep_rest: bool = False) -> None:
        """The model (the parameters of ``index``, default all) := the global parameters; ``keep_rest``: minus
        the unsent rest where the codec keeps it in the model."""
        rest = self.error_feedback.rest if keep_rest and self.rest_in_model else None
        self.buffers.copy_global_into_model(index, rest)

    def step_and_digest(self) -> tuple[int, str]:
        with self.lock:
            return self.outer_step, self.digest

    # ----- lineage ------------------------------------------------------------------------------------
    def chain_snapshot(self) -> Chain:
        with self.lock:
            return Chain(self.chain.manifest, self.chain.root_step, self.chain.root_digest, list(self.chain.certs))

    def push_lineage(self, start: int) -> None:
        """Hand the averager process our chain from certificate ``start`` on (it serves it as proof)."""
        entries = [(c.digest, c.encode()) for c in self.chain.certs[start:]]
        self.transport.set_lineage(self.chain.root_step, self.chain.root_digest, start, entries)

    def collect_signatures(self, peers: list[PeerProgress]) -> None:
        """Add group mates' signatures of rounds we hold (from their heartbeats) to our certificates."""
        first = None
        with self.lock:
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

    def commit(self, outcome, index, averaged, sent=None, decoded=None) -> str:
        """A committed round: the error feedback's residuals (``sent`` and what the group ``decoded`` of it), the
        outer step on the parameters ``index`` with the group's ``averaged`` update, and the round's certificate,
        together under the lock. Returns the new digest."""
        with self.lock:
            if decoded is not None:
                for i, s, d in zip(index, sent, decoded):
                    self.error_feedback.update(i, s, d)
            parent = self.digest
            apply_outer_step(self.outer_opt, [self.global_params[i] for i in index], [averaged[i] for i in index])
            self.outer_step += 1
            self.digest = params_digest(self.global_params)
            self._certify(outcome, self.outer_step - 1, parent, self.digest)
            return self.digest

    def _certify(self, outcome, step: int, parent: str, digest: str) -> None:
        """Sign the round just committed and append its certificate to our chain (under the lock)."""
        members = tuple(sorted({k for k in (public_key_of_peer_id(pid) for pid in outcome.gathered) if k}
                               | {self.identity.public_bytes}))
        samples = sum(max(0, int(m.get("samples", 0))) for m in outcome.gathered.values()
                      if isinstance(m.get("samples", 0), int))
        header = RoundHeader(manifest=self.manifest.hash, step=step, parent=bytes.fromhex(parent),
                             digest=bytes.fromhex(digest), members=members, samples=min(samples, 1 << 61))
        cert = sign_round(header, self.identity)
        self.chain.append(cert)
        self.attest.append((step, cert.sigs[0][1]))
        self.push_lineage(len(self.chain.certs) - 1)

    def serve(self) -> tuple[dict, list[torch.Tensor]]:
        """What a peer downloading our state gets (runs in hivemind's fetch thread: a consistent copy)."""
        with self.lock:
            momentum = [self.outer_opt.state.get(g, {}).get("momentum_buffer") for g in self.global_params]
            return pack_state(self.global_params, momentum, self.outer_step, self.manifest.hash, self.digest)

    def adopt(self, pending) -> None:
        """Take a proven heavier lineage and its downloaded state (a :class:`~swarmloco.node.catch_up.Pending`);
        this peer's unfinished inner work and its own rounds since the fork are dropped."""
        state, comparison = pending.state, pending.comparison
        with self.lock:
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
        self.restore_model()  # unfinished inner work is dropped: restart from the adopted params
        if self.rest_in_model:
            self.error_feedback.reset()  # (the rest it kept went with the model's inner work)
        self.phase.samples_since_sync = 0
        self.phase.inner_step = max(self.phase.inner_step, state.outer_step * self.phase.steps_per_round)
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

    # ----- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: the model's state dict holding the global parameters (the model is not touched)."""
        model = self.buffers.model
        with self.lock:
            by_id = {id(p): g for p, g in zip(model.parameters(), self.global_params)}
            weights = {k: by_id.get(id(v), v.detach()).cpu().clone() for k, v in model.state_dict(keep_vars=True).items()}
            return {
                "outer_step": self.outer_step,
                "manifest_hash": self.manifest.hash,
                "model": weights,
                "outer_optimizer": self.outer_opt.state_dict(),
                "inner_optimizer": self.inner_optimizer.state_dict(),
                "error_feedback": self.error_feedback.state_dict() if self.error_feedback is not None else None,
                "lineage": Chain(self.chain.manifest, self.chain.root_step, self.chain.root_digest,
                                 self.chain.certs).to_state(),
            }

    def load(self, state: dict[str, Any]) -> None:
        """Adopt a checkpoint (or a downloaded state) as this peer's global state."""
        model = self.buffers.model
        model.load_state_dict(state["model"])
        with torch.no_grad():  # the global copy from the saved fp32 values, not from the model's dtype
            for g, (name, p) in zip(self.global_params, model.named_parameters()):
                g.copy_(state["model"].get(name, p).detach().cpu().float())
        self.outer_opt.load_state_dict(state["outer_optimizer"])
        if state.get("inner_optimizer"):
            try:
                self.inner_optimizer.load_state_dict(state["inner_optimizer"])
            except (ValueError, KeyError) as e:
                logger.warning("ignoring the checkpoint's inner optimizer state: %s", e)
        if state.get("error_feedback") and self.error_feedback is not None:
            self.error_feedback.load_state_dict(state["error_feedback"])
            if self.rest_in_model:  # the model as it was: the global params minus the unsent rest
                if all(isinstance(k, int) and 0 <= k < len(self.global_params)
                       and r.shape == self.global_params[k].shape for k, r in self.error_feedback.residuals.items()):
                    self.restore_model(keep_rest=True)
                else:
                    logger.warning("ignoring the checkpoint's error feedback: it does not fit this model")
                    self.error_feedback.reset()
        self.outer_step = int(state["outer_step"])
        self.phase.inner_step = max(self.phase.inner_step, self.outer_step * self.phase.steps_per_round)
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

    def maybe_resume(self) -> None:
        """Load the run's newest checkpoint from ``checkpoint.dir``, if there is one."""
        if not self.checkpoint_cfg.dir:
            return
        state = latest_checkpoint(self.checkpoint_cfg.dir, self.manifest.hash)
        if state is None:
            logger.info("no checkpoint to resume from in %s; starting at outer step 0", self.checkpoint_cfg.dir)
            return
        self.load(state)
        self.board.event("checkpoint", f"resumed from outer step {self.outer_step}")

    def checkpoint_if_due(self) -> None:
        """Write a checkpoint every ``checkpoint.every`` outer steps (when a directory is configured)."""
        if self.checkpoint_cfg.dir and self.outer_step % self.checkpoint_cfg.every == 0:
            self.write_checkpoint()

    def write_checkpoint(self) -> None:
        if not self.checkpoint_cfg.dir:
            return
        try:
            path = save_checkpoint(self.checkpoint_cfg.dir, self.state_dict(), keep=self.checkpoint_cfg.keep)
        except CheckpointError as e:  # a full disk is survived: training goes on
            logger.error("%s", e)
            self.board.event("checkpoint", f"FAILED: {e}")
            return
        self.board.event("checkpoint", f"wrote {path}")


__all__ = ["PeerState"]
