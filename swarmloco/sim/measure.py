"""Throughput and error of codecs, measured on real pseudo-gradients (used by scripts/bench_codecs.py).

Figures are per core (``torch.set_num_threads(1)``) in GB/s of float32 *input*, best of ``repeats``
timed runs after a warm-up, so that a shared machine's noise inflates them as little as possible.
The pseudo-gradient is what DiLoCo actually sends: initial parameters minus parameters after a few
AdamW steps of swarmloco's own GPT on the stdlib byte corpus.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from swarmloco.compression.base import Codec


@dataclass(frozen=True)
class CodecMeasurement:
    codec: str
    tensor: str
    numel: int
    ratio: float
    """Payload bytes / float32 bytes."""
    encode_gbps: float
    decode_gbps: float
    roundtrip_gbps: float
    """numel * 4 bytes / (encode time + decode time)."""
    rel_error: float
    """||decode(encode(x)) - x|| / ||x||."""

    def as_dict(self) -> dict:
        return asdict(self)


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    return float((x - y).norm() / x.norm().clamp_min(1e-300))


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_codec(codec: Codec, tensor: torch.Tensor, label: str, repeats: int = 5) -> CodecMeasurement:
    """Time encode and decode of one flat float32 tensor on the current thread settings."""
    flat = tensor.detach().reshape(-1).to(torch.float32).contiguous()
    payload = codec.encode(flat)
    decoded = codec.decode(payload, flat.numel())
    t_enc = _best_time(lambda: codec.encode(flat), repeats)
    t_dec = _best_time(lambda: codec.decode(payload, flat.numel()), repeats)
    gb = flat.numel() * 4 / 1e9
    return CodecMeasurement(
        codec=codec.info.name, tensor=label, numel=flat.numel(), ratio=len(payload) / (4 * flat.numel()),
        encode_gbps=gb / t_enc, decode_gbps=gb / t_dec, roundtrip_gbps=gb / (t_enc + t_dec),
        rel_error=relative_error(flat, decoded),
    )


def real_pseudo_gradient(steps: int = 30, seed: int = 0, n_layer: int = 4, n_embd: int = 256,
                         block_size: int = 128) -> torch.Tensor:
    """Flat (initial - trained) parameters of swarmloco's GPT after ``steps`` AdamW steps on CPU."""
    from swarmloco.config import DataConfig, InnerConfig, ModelConfig  # noqa: PLC0415 (keep codecs import-light)
    from swarmloco.data.text import Corpus  # noqa: PLC0415
    from swarmloco.app.inner_loop import InnerTrainer  # noqa: PLC0415
    from swarmloco.models.gpt import GPT  # noqa: PLC0415

    model_cfg = ModelConfig(n_layer=n_layer, n_embd=n_embd, block_size=block_size)
    model = GPT(model_cfg, seed=seed)
    initial = [p.detach().clone() for p in model.parameters()]
    corpus = Corpus(DataConfig(max_bytes=2_000_000, num_shards=4, batch_size=16), block_size, seed)
    trainer = InnerTrainer(model, InnerConfig(warmup_steps=5, total_steps=steps), torch.device("cpu"))
    trainer.train(corpus.train_batches(0), steps)
    return torch.cat([(a - p.detach()).reshape(-1) for a, p in zip(initial, model.parameters())])


def tile_to(tensor: torch.Tensor, numel: int) -> torch.Tensor:
    """Repeat a flat tensor until it holds ``numel`` values (for throughput on large tensors)."""
    flat = tensor.reshape(-1)
    return flat.repeat(-(-numel // flat.numel()))[:numel].contiguous()
