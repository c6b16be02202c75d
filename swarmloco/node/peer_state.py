"""A peer's state: checkpoints, serving it to others, and catching up with the swarm.

A mixin of :class:`swarmloco.node.peer.Peer` (it uses the peer's model, global parameters, outer
optimizer, transport and status board). A peer behind the swarm (late join, restart, a failed round
while its group committed, woken from SIGSTOP) adopts the swarm's state and drops its unfinished inner
work: the local model restarts from the adopted global parameters (see :mod:`state_sync` for the
lineage rule and the checks on what arrives).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from swarmloco.node.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from swarmloco.node.inner_loop import evaluate
from swarmloco.node.state_sync import StateError, Target, pack_state, params_digest, state_bytes, unpack_state

logger = logging.getLogger(__name__)


class PeerState:
    """Checkpoints, state serving and catching up, for :class:`~swarmloco.node.peer.Peer`."""

    def _copy_global_into_model(self) -> None:
        with torch.no_grad():
            for p, g in zip(self.model.parameters(), self.global_params):
                p.copy_(g, non_blocking=True)  # from pinned memory on CUDA: asynchronous
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the outer step may rewrite the source buffers next

    def load_state(self, state: dict[str, Any]) -> None:
        """Adopt a checkpoint (or a downloaded state) as this peer's global state."""
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            for g, p in zip(self.global_params, self.model.parameters()):
                g.copy_(p.detach().cpu().float())
        self.outer_opt.load_state_dict(state["outer_optimizer"])
        if state.get("inner_optimizer"):
            try:
                self.inner.optimizer.load_state_dict(state["inner_optimizer"])
            except (ValueError, KeyError) as e:
                logger.warning("ignoring the checkpoint's inner optimizer state: %s", e)
        if state.get("error_feedback") and self.error_feedback is not None:
            self.error_feedback.load_state_dict(state["error_feedback"])
        self.outer_step = int(state["outer_step"])
        self.digest = params_digest(self.global_params)
        self.board.update(outer_step=self.outer_step)

    def state_dict(self) -> dict[str, Any]:
        self._copy_global_into_model()
        return {
            "outer_step": self.outer_step,
            "manifest_hash": self.manifest.hash,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "outer_optimizer": self.outer_opt.state_dict(),
            "inner_optimizer": self.inner.optimizer.state_dict(),
            "error_feedback": self.error_feedback.state_dict() if self.error_feedback is not None else None,
        }

    def _serve_state(self) -> tuple[dict, list[torch.Tensor]]:
        """What a peer downloading our state gets (runs in hivemind's fetch thread: a consistent copy)."""
        with self._lock:
            momentum = [self.outer_opt.state.get(g, {}).get("momentum_buffer") for g in self.global_params]
            return pack_state(self.global_params, momentum, self.outer_step, self.manifest.hash, self.digest)

    def catch_up(self, target: Target) -> bool:
        """Download and adopt the state of the lineage ``target`` names; False if no source served it."""
        prior = self._state
        self._set_state("joining")  # not serving a state while replacing it
        max_bytes = int(state_bytes(self.global_params) * 1.05) + (1 << 20)
        errors: list[str] = []
        # a shard from each of several holders at once, then (if that fails the checks) one holder at a time
        tries = [(list(target.sources), self.cfg.swarm.download_sources)] if (
            self.cfg.swarm.download_sources > 1 and len(target.sources) > 1) else []
        tries += [([source], 1) for source in target.sources]
        try:
            for sources, parallel in tries:
                got, errs = self.transport.download_state(sources, timeout=self.cfg.swarm.state_timeout,
                                                          max_bytes=max_bytes, parallel=parallel)
                errors += errs
                if got is None:
                    continue
                who = f"peer {got.peer_id[-8:]}" if len(got.sources) <= 1 else f"{len(got.sources)} peers"
                try:
                    adopted = unpack_state(got.metadata, got.tensors, manifest_hash=self.manifest.hash,
                                           templates=self.global_params, target=target)
                except StateError as e:
                    logger.error("state from %s rejected: %s", who, e)
                    errors.append(f"{who}: {e}")
                    continue
                self._adopt(adopted.params, adopted.momentum, adopted.outer_step, adopted.digest)
                self.board.add(state_downloads=1, state_bytes_received=got.bytes)
                self.board.event("state_downloaded",
                                 f"adopted outer step {adopted.outer_step} from {who} "
                                 f"({got.bytes / 1e6:.2f} MB in {got.seconds:.3f}s)")
                logger.info("adopted the swarm's state at outer step %d from %s (%.1f MB in %.2fs)",
                            adopted.outer_step, who, got.bytes / 1e6, got.seconds)
                return True
            logger.warning("could not download the swarm's state at outer step %d: %s", target.outer_step,
                           "; ".join(errors) or "no source")
            self.board.event("state_download_failed", f"outer step {target.outer_step}: {'; '.join(errors)[:200]}")
            return False
        finally:
            self._set_state(prior if prior != "joining" else "training")

    def _adopt(self, params: list[torch.Tensor], momentum: list[torch.Tensor] | None, outer_step: int,
               digest: str) -> None:
        with self._lock:
            for g, p in zip(self.global_params, params):
                g.copy_(p)
            self.outer_opt.state.clear()
            if momentum is not None:
                for g, m in zip(self.global_params, momentum):
                    self.outer_opt.state[g]["momentum_buffer"] = m.clone()
            self.outer_step, self.digest = outer_step, digest
        self._copy_global_into_model()  # unfinished inner work is dropped: restart from the adopted params
        self._samples_since_sync = 0
        self.inner.step_count = max(self.inner.step_count, outer_step * self.H)  # the LR schedule's position
        self.board.update(outer_step=outer_step)

    def maybe_resume(self) -> None:
        if not (self.options.resume and self.cfg.checkpoint.dir):
            return
        state = latest_checkpoint(self.cfg.checkpoint.dir, self.manifest.hash)
        if state is None:
            logger.info("no checkpoint to resume from in %s; starting at outer step 0", self.cfg.checkpoint.dir)
            return
        self.load_state(state)
        self.board.event("checkpoint", f"resumed from outer step {self.outer_step}")

    def checkpoint_if_due(self) -> None:
        """Write a checkpoint every ``checkpoint.every`` outer steps (when a directory is configured)."""
        if self.cfg.checkpoint.dir and self.outer_step % self.cfg.checkpoint.every == 0:
            self.write_checkpoint()

    def write_checkpoint(self) -> None:
        if not self.cfg.checkpoint.dir:
            return
        try:
            path = save_checkpoint(self.cfg.checkpoint.dir, self.state_dict(), keep=self.cfg.checkpoint.keep)
        except CheckpointError as e:  # a full disk is survived: training goes on
            logger.error("%s", e)
            self.board.event("checkpoint", f"FAILED: {e}")
            return
        self.board.event("checkpoint", f"wrote {path}")

    def _catch_up_instead_of_round(self, target: Target, result, t0: float) -> None:
        ok = self.catch_up(target)
        eval_loss = evaluate(self.model, self.eval_set, self.device) if ok else float("nan")
        self.board.update(outer_step=self.outer_step, eval_loss=eval_loss)
        self.board.round_done({
            "peer_id": self.transport.peer_id, "outer_step": self.outer_step, "ok": ok, "adopted": True,
            "train_loss": result.mean_loss, "eval_loss": eval_loss, "peers": 1, "samples_per_second": self._last_sps,
            "bytes_sent": 0, "bytes_received": 0, "round_time": time.perf_counter() - t0, "sync_s": 0.0,
            "digest": self.digest, "error": None if ok else "could not download the swarm's state",
            "fp32_bytes": 4 * sum(p.numel() for p in self.global_params), "initial_eval_loss": self.initial_eval_loss,
            "attempts": 0, "inner_steps": result.steps, "samples": result.samples, "clipped": [], "capped": [], "rejected": [],
            "excluded": self.membership.excluded_peers(),
        })
        if ok:
            self.checkpoint_if_due()  # an adopted state is as good a restart point as a committed one
