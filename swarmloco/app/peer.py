"""The CLI's peer: a model and data built from the run config, trained by the built-in loop through the
public API (:class:`swarmloco.DiLoCo` on a :class:`swarmloco.Swarm`), exactly as a user's own loop would.

The loop: one inner step (:class:`~swarmloco.app.inner_loop.InnerTrainer`: AdamW at the warmup+cosine
schedule's learning rate, bf16 autocast on CUDA, grad clipping) on the peer's data shard, then
``diloco.step(samples, loss)``, which runs the outer round when it is due and reports it; until
``max_outer_steps`` rounds or a stop signal. Everything the swarm does - rounds, re-runs, catching up,
certificates, checkpoints, exclusion, status - is the engine's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from swarmloco.config import RunConfig
from swarmloco.data import build_corpus, prepare_data, shard_for_peer
from swarmloco.models import build_model as build_model_of, check_vocab, lm_loss, num_params, prepare_model
from swarmloco.node.diloco import DiLoCo, fingerprint
from swarmloco.app.inner_loop import InnerTrainer, evaluate, inner_optimizer
from swarmloco.node.state_sync import params_digest
from swarmloco.node.status import StatusBoard
from swarmloco.protocol import faults
from swarmloco.protocol.manifest import RunManifest

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


def prepare_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with what the manifest must pin resolved (a pretrained model's sha256, the tokenizer's,
    trained reproducibly on the run's data if need be), or checked against what it pins already (one-line
    ValueError). Run it before the manifest is hashed: ``run``, ``join`` and ``init-run`` do."""
    return cfg.replace(model=prepare_model(cfg.model), data=prepare_data(cfg.data))


def build_model(cfg: RunConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The run's model, initialised from its seed (identical on every peer)."""
    return build_model_of(cfg.model, cfg.seed).to(device)


def run_manifest(cfg: RunConfig) -> RunManifest:
    """The manifest a CLI peer of ``cfg`` (prepared) runs: the config's shared sections plus its model's
    fingerprint and genesis (what ``init-run`` signs and ``join`` checks)."""
    model = build_model(cfg)
    return RunManifest.from_dict({**cfg.manifest_dict(), "fingerprint": fingerprint(model),
                                  "genesis": params_digest(p.detach().float() for p in model.parameters())})


class Peer:
    """One CLI swarm member on ``swarm`` (a started :class:`~swarmloco.Swarm`); call :meth:`run`."""

    def __init__(self, cfg: RunConfig, swarm, options: PeerOptions | None = None, board: StatusBoard | None = None,
                 corpus=None):
        """``cfg``: prepared (:func:`prepare_config`)."""
        self.cfg, self.swarm = cfg, swarm
        self.options = options or PeerOptions()
        self.board = board or StatusBoard()
        self.stop = swarm.stop
        self.device = pick_device(self.options.device)
        self.model = build_model(cfg, self.device)
        self.corpus = corpus or build_corpus(cfg.data, cfg.model.block_size, cfg.seed)
        check_vocab(self.model, self.corpus.vocab_size)
        self.shard = self.options.shard if self.options.shard is not None else shard_for_peer(
            swarm.peer_id, cfg.data.num_shards)
        self.batches = self.corpus.train_batches(self.shard, stream_seed=0)
        self.eval_set = self.corpus.eval_batches()
        self.diloco = DiLoCo(
            swarm, self.model, lambda params: inner_optimizer(self.model, cfg.inner, self.device),
            inner_steps=self.options.inner_steps or cfg.inner.steps, outer=cfg.outer, codec=cfg.codec,
            access=cfg.access, checkpoint=cfg.checkpoint, resume=self.options.resume, board=self.board,
            evaluate=lambda: evaluate(self.model, self.eval_set, self.device, lm_loss), manifest=cfg.manifest_dict())
        self.inner = InnerTrainer(self.model, cfg.inner, self.device, self.diloco.inner_optimizer, lm_loss)
        self._step_delay = faults.inner_step_delay()  # injected slowness (tests); 0 normally
        self.board.update(shard=self.shard, num_params=num_params(self.model), **self.options.extra_status)

    @property
    def outer_step(self) -> int:
        return self.diloco.outer_step

    def run(self) -> int:
        """Train until max_outer_steps rounds or stop; returns the number of outer steps this run took."""
        diloco = self.diloco
        try:
            diloco.start()
            start_step = diloco.outer_step
            logger.info("peer %s: %d params, shard %d, device %s, manifest %s, initial eval loss %.4f",
                        self.swarm.peer_id[-8:], num_params(self.model), self.shard, self.device,
                        diloco.manifest.short, diloco.initial_eval_loss)
            limit = self.options.max_outer_steps
            while not self.stop.is_set() and (limit is None or diloco.outer_step - start_step < limit):
                flying = diloco.in_flight
                if limit is not None and flying is not None and flying + 1 - start_step >= limit:
                    diloco.wait_for_round()  # the last round (overlapped) lands: no inner step after it
                    continue
                x, y = next(self.batches)
                loss = self.inner.step(x, y, diloco.inner_step)
                if self._step_delay:
                    self.stop.wait(self._step_delay)
                diloco.step(samples=x.shape[0], loss=loss)
            return diloco.outer_step - start_step
        finally:
            diloco.close()


__all__ = ["Peer", "PeerOptions", "build_model", "pick_device", "prepare_config", "run_manifest"]
