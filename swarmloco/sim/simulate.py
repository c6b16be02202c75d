"""In-process simulations of multi-worker training, for quality benchmarks and tests.

Both train ``workers`` replicas on disjoint data shards in one process on one device, the workers run one
after the other (deterministic, no networking):

* :func:`run_data_parallel`: synchronous data parallelism, i.e. one AdamW step per step on the gradient
  averaged over the workers' batches (gradient accumulation); ``workers=1`` is a plain single worker.
* :func:`run_diloco`: DiLoCo (Douillard et al. 2023, arXiv:2311.08105): each worker's
  :class:`~swarmloco.app.inner_loop.InnerTrainer` (AdamW state kept across rounds) runs ``H`` inner steps,
  the pseudo-gradients are averaged with equal weights (optionally through a codec: :func:`codec_transform`),
  the outer optimizer steps the global parameters and every worker lands on them.

Both return a JSON-serialisable dict: ``final_eval_loss``, ``curve`` (per evaluation: ``step``, ``eval_loss``,
``train_loss`` = mean since the previous point), ``wall_s``, ``tokens`` (all workers), ``num_params`` and
``bytes_sent_per_worker`` (ring all-reduce model: ``2(n-1)/n`` times the payload per synchronisation).
The inner lr schedule follows ``inner_cfg`` as given: ``inner_cfg.total_steps = steps`` decays over the run.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence

import torch

from swarmloco.config import CodecConfig, InnerConfig, ModelConfig, OuterConfig
from swarmloco.data.text import Corpus
from swarmloco.app.inner_loop import InnerTrainer, evaluate, inner_lr
from swarmloco.models import build_model, lm_loss, num_params
from swarmloco.outer_optim import apply_outer_step, build_outer_optimizer
from swarmloco.outer_optim.overlap import (apply_correction, fragment_partition, landing_correction, proxy_step,
                                           round_fragment)

__all__ = [
    "allreduce_bytes_per_worker", "codec_transform", "run_data_parallel", "run_diloco", "PseudoGradTransform",
]

logger = logging.getLogger(__name__)

PseudoGradTransform = Callable[..., list[torch.Tensor]]
"""``transform(worker_index, pseudo_grad_tensors, keys=param_indices, step=round) -> tensors`` of the same shapes
(``keys``: which parameters the tensors are, for per-parameter state such as error feedback: a fragment's round
passes only its own; ``step``: the round's number, the outer step a peer would be at). A transform with a
``feedback`` attribute (one error feedback per worker, or None) whose rest is kept in the model
(``in_model``: the rotate and hadtopk codecs) has each worker land at the new global parameters minus its rest."""

CPU = torch.device("cpu")


def codec_transform(cfg: CodecConfig, workers: int) -> PseudoGradTransform:
    """A :data:`PseudoGradTransform` sending each pseudo-gradient tensor through the codec ``cfg`` names.

    Per worker and tensor, exactly what a peer does: error-feedback compensate -> ``codec.roundtrip``
    -> error-feedback update, with one accumulator per worker built by
    :func:`~swarmloco.compression.error_feedback.error_feedback_for` (none for a lossless codec or
    ``error_feedback = false``; decaying by ``topk_decay`` for the sparse codec). Pair it with
    ``bytes_per_value=ring_equivalent_bytes_per_value(codec, workers)`` in :func:`run_diloco`. Its
    ``sparse`` attribute (a sparse codec) makes :func:`run_diloco` average each coordinate over the workers
    that sent it, as the all-gather does; its ``feedback`` (the workers' error feedback) keeps the ``rotate``
    and ``hadtopk`` codecs' unsent rest in each worker's parameters when the round lands, as a peer does.
    """
    from swarmloco.compression.error_feedback import error_feedback_for
    from swarmloco.compression.registry import get_codec

    codec = get_codec(cfg)
    feedback = [error_feedback_for(cfg, codec) for _ in range(workers)]

    def transform(worker: int, tensors: list[torch.Tensor], keys: Sequence[int] | None = None,
                  step: int = 0) -> list[torch.Tensor]:
        ef, out, round_codec = feedback[worker], [], codec.for_round(step)
        for i, t in zip(range(len(tensors)) if keys is None else keys, tensors):
            x = ef.compensate(i, t) if ef is not None else t.detach().to(torch.float32)
            sent = round_codec.roundtrip(x.cpu()).to(device=t.device, dtype=t.dtype)
            if ef is not None:
                ef.update(i, x, sent)
            out.append(sent)
        return out

    transform.sparse = codec.info.per_sender  # top-k: the round averages each coordinate over its senders
    transform.feedback = feedback
    return transform


def ring_equivalent_bytes_per_value(codec, workers: int) -> float:
    """What one value costs in :func:`allreduce_bytes_per_worker`'s ring model with ``codec``.

    Dense codecs are all-reduced: ``bits / 8``. A sparse codec is all-gathered (each worker sends its
    payload to the ``n - 1`` others, not ``2(n-1)/n`` of it), so its bytes count ``n / 2`` times more.
    """
    per_value = codec.info.bits_per_value / 8
    return per_value if codec.info.summable else per_value * workers / 2


def allreduce_bytes_per_worker(payload_values: int, workers: int, bytes_per_value: float = 4.0) -> float:
    """Bytes one worker sends in one ring all-reduce of ``payload_values`` values (0 for one worker)."""
    if workers <= 1:
        return 0.0
    return 2.0 * (workers - 1) / workers * payload_values * bytes_per_value


def worker_streams(corpus: Corpus, shards: Sequence[int], seed: int):
    """Worker ``i``'s batch stream: shard ``shards[i]`` drawn with stream seed ``seed``; workers that share
    a shard (IID data: one shard for all) draw different batches (stream seed ``(seed, i)``)."""
    shared = {s for s in shards if list(shards).count(s) > 1}
    return [corpus.train_batches(s, stream_seed=(seed, i) if s in shared else seed) for i, s in enumerate(shards)]


class _Curve:
    """Collects evaluation points; decides when an evaluation is due."""

    def __init__(self, model: torch.nn.Module, eval_batches, device: torch.device, eval_every: int,
                 steps: int, name: str):
        self.model, self.batches, self.device = model, eval_batches, device
        self.eval_every, self.steps, self.name = eval_every, steps, name
        self.points: list[dict] = []
        self.train_losses: list[float] = []
        self.last = 0
        self.record(0)

    def record(self, step: int) -> None:
        loss = evaluate(self.model, self.batches, self.device, lm_loss)
        train = sum(self.train_losses) / len(self.train_losses) if self.train_losses else None
        self.points.append({"step": step, "eval_loss": loss, "train_loss": train})
        self.train_losses = []
        self.last = step
        logger.info("%s step %d: eval %.4f train %s", self.name, step, loss,
                    "-" if train is None else f"{train:.4f}")

    def maybe_record(self, step: int) -> None:
        """Evaluate if ``step`` crossed a multiple of ``eval_every`` since the last point, or is the end."""
        if step == self.steps or step // self.eval_every > self.last // self.eval_every:
            self.record(step)


def _result(curve: _Curve, start: float, tokens: int, params: int, bytes_sent: float, **extra) -> dict:
    return {
        "final_eval_loss": curve.points[-1]["eval_loss"],
        "curve": curve.points,
        "wall_s": time.perf_counter() - start,
        "tokens": tokens,
        "num_params": params,
        "bytes_sent_per_worker": bytes_sent,
        **extra,
    }


def run_data_parallel(corpus: Corpus, model_cfg: ModelConfig, inner_cfg: InnerConfig, *, workers: int,
                      steps: int, seed: int = 0, shards: Sequence[int] | None = None, eval_every: int = 100,
                      device: torch.device = CPU, keep_model: bool = False) -> dict:
    """Synchronous data parallelism over ``workers`` shards for ``steps`` AdamW steps.

    The model is initialised with ``seed`` and worker ``i`` draws batches from shard ``shards[i]``
    (default ``i``) with stream seed ``seed`` -- the same batches worker ``i`` sees in
    :func:`run_diloco` with the same seed. Gradient clipping applies to the averaged gradient.
    """
    shards = list(range(workers)) if shards is None else list(shards)
    if len(shards) != workers:
        raise ValueError(f"{workers} workers but {len(shards)} shards")
    start = time.perf_counter()
    model = build_model(model_cfg, seed).to(device)
    trainer = InnerTrainer(model, inner_cfg, device, loss_fn=lm_loss)
    streams = worker_streams(corpus, shards, seed)
    curve = _Curve(model, corpus.eval_batches(), device, eval_every, steps, f"dp{workers}")
    tokens = 0
    model.train()
    for step in range(steps):
        lr = inner_lr(inner_cfg, trainer.step_count)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        trainer.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for stream in streams:
            x, y = next(stream)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=trainer.autocast):
                loss = lm_loss(model, x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            (loss / workers).backward()
            step_loss += float(loss.detach()) / workers
            tokens += y.numel()
        if inner_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), inner_cfg.grad_clip)
        trainer.optimizer.step()
        trainer.step_count += 1
        curve.train_losses.append(step_loss)
        curve.maybe_record(step + 1)
    params = num_params(model)
    bytes_sent = steps * allreduce_bytes_per_worker(params, workers)
    extra = {"model": model} if keep_model else {}
    return _result(curve, start, tokens, params, bytes_sent, method="data_parallel", workers=workers,
                   steps=steps, seed=seed, syncs=steps if workers > 1 else 0, **extra)


def run_diloco(corpus: Corpus, model_cfg: ModelConfig, inner_cfg: InnerConfig, outer_cfg: OuterConfig, *,
               workers: int, steps: int, H: int, seed: int = 0, shards: Sequence[int] | None = None,
               eval_every: int | None = None, transform: PseudoGradTransform | None = None,
               bytes_per_value: float = 4.0, device: torch.device = CPU, keep_model: bool = False,
               keep_locals: bool = False) -> dict:
    """DiLoCo with ``workers`` simulated workers, ``steps`` inner steps each, an outer step every ``H``.

    If ``steps`` is not a multiple of ``H`` the last round is shorter. The global model is evaluated
    at step 0, whenever a round ends past a multiple of ``eval_every`` (default ``H``), and at the end.
    ``transform`` (see :data:`PseudoGradTransform`) is applied to each worker's pseudo-gradient
    before averaging; ``bytes_per_value`` is what one transmitted value costs (4 for fp32).

    ``outer_cfg.overlap`` / ``overlap_steps`` / ``overlap_alpha`` / ``fragments`` follow the peer's rules
    (:mod:`swarmloco.outer_optim.overlap`): a round starts every ``H / fragments`` steps on one fragment and,
    when overlapped, lands exactly ``tau`` steps later (``overlap_steps``, up to ``H``: then several rounds
    are in flight; ``overlap_steps = 0`` at the end of its phase, ``H / fragments`` steps; the rounds still in
    flight at the end land before the final evaluation). A round "ends" for the evaluation schedule when it
    lands.
    """
    shards = list(range(workers)) if shards is None else list(shards)
    if len(shards) != workers:
        raise ValueError(f"{workers} workers but {len(shards)} shards")
    if H <= 0:
        raise ValueError(f"H must be > 0, got {H}")
    outer_cfg.check_inner_steps(H, "H")
    if any(ef is not None and ef.in_model for ef in getattr(transform, "feedback", None) or ()) and (
            outer_cfg.overlapped or outer_cfg.fragments > 1):
        raise ValueError("a codec keeping its rest in the model (rotate, hadtopk) needs blocking rounds of the whole "
                         "model")
    start = time.perf_counter()
    global_model = build_model(model_cfg, seed).to(device)
    global_params = list(global_model.parameters())
    outer = build_outer_optimizer(global_params, outer_cfg)
    local_models = [copy.deepcopy(global_model) for _ in range(workers)]
    trainers = [InnerTrainer(m, inner_cfg, device, loss_fn=lm_loss) for m in local_models]
    streams = worker_streams(corpus, shards, seed)
    curve = _Curve(global_model, corpus.eval_batches(), device, eval_every or H, steps, f"diloco{workers}-H{H}")
    names, numels = zip(*((n, p.numel()) for n, p in global_model.named_parameters()))
    parts = fragment_partition(names, numels, outer_cfg.fragments)
    phase = H // outer_cfg.fragments
    # overlap_steps = 0 (a peer lands a round as soon as it arrived): modelled as the end of its phase, what a
    # peer whose rounds keep up with training gets at the latest (a slower link lands later, up to H)
    tau = outer_cfg.overlap_steps or phase if outer_cfg.overlapped else 0
    done, rounds, tokens, payload = 0, 0, 0, 0
    inflight: list[_SimRound] = []  # oldest first; several with fragments and tau > H / F
    while done < steps:
        n = min(phase, steps - done)  # the next round starts after n steps; rounds in flight land on the way
        while n > 0:
            length = n if not inflight else max(0, min(n, inflight[0].land_at - done))
            if length > 0:
                losses = []
                for trainer, stream in zip(trainers, streams):
                    result = trainer.train(stream, length)
                    losses.append(result.mean_loss)
                    tokens += result.samples * model_cfg.block_size
                curve.train_losses.extend([sum(losses) / workers] * length)
                done, n = done + length, n - length
            while inflight and (inflight[0].land_at <= done or done == steps):  # (the run ends: all land)
                inflight.pop(0).land(outer, global_params, local_models)
                curve.maybe_record(done)
        index = parts[round_fragment(rounds, outer_cfg.fragments)]
        payload += sum(numels[i] for i in index)
        inflight.append(_SimRound(outer_cfg, outer, global_params, local_models, index, transform, done + tau,
                                  step=rounds))
        rounds += 1
        if tau == 0 or done == steps:  # blocking, or the run's last round: every round in flight lands now
            while inflight:
                inflight.pop(0).land(outer, global_params, local_models)
            curve.maybe_record(done)
    params = num_params(global_model)
    bytes_sent = allreduce_bytes_per_worker(payload, workers, bytes_per_value)
    extra = {"model": global_model} if keep_model else {}
    if keep_locals:
        extra["locals"] = local_models
    return _result(curve, start, tokens, params, bytes_sent, method="diloco", workers=workers, steps=steps,
                   seed=seed, H=H, syncs=rounds, outer_lr=outer_cfg.lr, outer_momentum=outer_cfg.momentum,
                   overlap=outer_cfg.overlap, overlap_steps=tau, fragments=outer_cfg.fragments, **extra)


class _SimRound:
    """One simulated round of every worker: its pseudo-gradients averaged at once, the outer step and each
    worker's landing applied :meth:`land` (``tau`` steps later when overlapped)."""

    def __init__(self, cfg: OuterConfig, outer, global_params, local_models, index: Sequence[int],
                 transform: PseudoGradTransform | None, land_at: int, step: int = 0):
        self.cfg, self.index, self.land_at = cfg, list(index), land_at
        feedback = getattr(transform, "feedback", None) or [None] * len(local_models)
        self.kept = [ef if ef is not None and ef.in_model else None for ef in feedback]  # (rotate, hadtopk)
        theta = [global_params[i] for i in self.index]
        summed: list[torch.Tensor] | None = None
        sparse = len(local_models) > 1 and getattr(transform, "sparse", False)  # as the all-gather combines them
        sent: list[list[torch.Tensor]] = []  # (sparse: every worker's payloads, for the per-coordinate senders)
        self.proxies: list[list[torch.Tensor]] = []
        with torch.no_grad():
            for w, model in enumerate(local_models):
                local = list(model.parameters())
                pseudo = [theta[j].detach() - local[i].detach() for j, i in enumerate(self.index)]
                if cfg.overlap == "eager":
                    proxy = proxy_step(outer, theta, pseudo)
                    for i, p in zip(self.index, proxy):
                        local[i].copy_(p)
                else:
                    proxy = [local[i].detach().clone() for i in self.index]
                self.proxies.append(proxy)
                if transform is not None:
                    pseudo = transform(w, pseudo, keys=self.index, step=step)
                if sparse:
                    sent.append(pseudo)
                summed = ([t.clone() for t in pseudo] if summed is None
                          else [a.add_(b) for a, b in zip(summed, pseudo)])
        if len(local_models) == 1:
            self.averaged = summed
        elif sparse:
            from swarmloco.protocol.robust import sender_mean
            ones = [1.0] * len(local_models)
            self.averaged = [sender_mean(t, [p[j] for p in sent], ones) for j, t in enumerate(summed)]
        else:
            self.averaged = [t.div_(len(local_models)) for t in summed]

    def land(self, outer, global_params, local_models) -> None:
        theta = [global_params[i] for i in self.index]
        apply_outer_step(outer, theta, self.averaged)
        blocking = self.cfg.delay_steps(1 << 30) == 0
        with torch.no_grad():
            for model, proxy, kept in zip(local_models, self.proxies, self.kept):
                local = list(model.parameters())
                if blocking:
                    for i, t in zip(self.index, theta):
                        rest = kept.rest(i) if kept is not None else None
                        local[i].copy_(t) if rest is None else local[i].copy_(t - rest.to(t.device))
                    continue
                alpha = self.cfg.overlap_alpha
                for i, c in zip(self.index, landing_correction(theta, proxy, alpha)):
                    apply_correction(local[i], c, alpha)
