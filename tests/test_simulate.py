"""The in-process DiLoCo / data-parallel simulation (swarmloco.node.simulate)."""

from __future__ import annotations

import torch

from swarmloco.config import DataConfig, InnerConfig, ModelConfig, OuterConfig
from swarmloco.data.text import Corpus
from swarmloco.node.inner_loop import InnerTrainer
from swarmloco.models.gpt import GPT
from swarmloco.compression.registry import get_codec
from swarmloco.config import CodecConfig
from swarmloco.node.simulate import allreduce_bytes_per_worker, codec_transform, run_data_parallel, run_diloco

MODEL = ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)
DATA = DataConfig(num_shards=4, batch_size=8, eval_batches=4)


def _corpus() -> Corpus:
    # A learnable synthetic byte stream: a repeated phrase with a little noise.
    gen = torch.Generator().manual_seed(0)
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. "), dtype=torch.uint8)
    tokens = text.repeat(2000)
    noise = torch.rand(tokens.shape, generator=gen) < 0.05
    tokens[noise] = torch.randint(0, 256, (int(noise.sum()),), generator=gen, dtype=torch.uint8)
    return Corpus(DATA, MODEL.block_size, seed=0, tokens=tokens)


def _plain_adamw(corpus: Corpus, inner: InnerConfig, steps: int, seed: int, outer_round_trip: bool) -> GPT:
    """Plain AdamW on shard 0; with ``outer_round_trip`` each step's params p become g - (g - p) in fp32."""
    ref = GPT(MODEL, seed=seed)
    trainer, stream = InnerTrainer(ref, inner, torch.device("cpu")), corpus.train_batches(0, stream_seed=seed)
    for _ in range(steps):
        before = [p.detach().clone() for p in ref.parameters()]
        trainer.train(stream, 1)
        if outer_round_trip:
            with torch.no_grad():
                for g, p in zip(before, ref.parameters()):
                    p.copy_(g - (g - p))
    return ref


def test_diloco_h1_one_worker_plain_averaging_is_plain_adamw():
    """One worker, H=1, outer lr=1, momentum=0: every round is one AdamW step, then p <- g - (g - p).

    In exact arithmetic that is plain AdamW. In fp32, g - (g - p) != p for a few elements (when
    g - p is not representable), so DiLoCo matches, bit for bit, AdamW *with that fp32 round trip*,
    and plain AdamW only up to those round-offs (Adam amplifies them where a gradient is ~0, e.g.
    the attention key bias, hence atol 1e-5, still 100x below one step of lr 1e-3).
    """
    torch.set_num_threads(1)
    corpus, steps, seed = _corpus(), 12, 3
    inner = InnerConfig(warmup_steps=3, total_steps=steps)
    outer = OuterConfig(lr=1.0, momentum=0.0, nesterov=False)
    res = run_diloco(corpus, MODEL, inner, outer, workers=1, steps=steps, H=1, seed=seed, keep_model=True)
    assert res["syncs"] == steps and res["bytes_sent_per_worker"] == 0.0

    exact = _plain_adamw(corpus, inner, steps, seed, outer_round_trip=True)
    for (name, a), b in zip(res["model"].named_parameters(), exact.parameters()):
        assert torch.equal(a, b), f"{name} differs by {(a - b).abs().max().item()}"
    plain = _plain_adamw(corpus, inner, steps, seed, outer_round_trip=False)
    for (name, a), b in zip(res["model"].named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_diloco_loss_goes_down_and_accounting():
    torch.set_num_threads(1)
    corpus, steps, H = _corpus(), 40, 10
    inner = InnerConfig(warmup_steps=5, total_steps=steps, lr=1e-3)
    res = run_diloco(corpus, MODEL, inner, OuterConfig(), workers=2, steps=steps, H=H, seed=0)
    losses = [p["eval_loss"] for p in res["curve"]]
    assert [p["step"] for p in res["curve"]] == [0, 10, 20, 30, 40]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 1.0, losses
    assert res["syncs"] == steps // H
    assert res["tokens"] == 2 * steps * DATA.batch_size * MODEL.block_size
    assert res["bytes_sent_per_worker"] == 4 * allreduce_bytes_per_worker(res["num_params"], 2)


def test_data_parallel_runs_and_counts_bytes():
    torch.set_num_threads(1)
    corpus, steps = _corpus(), 10
    res = run_data_parallel(corpus, MODEL, InnerConfig(warmup_steps=2, total_steps=steps, lr=3e-3),
                            workers=2, steps=steps, eval_every=5)
    assert [p["step"] for p in res["curve"]] == [0, 5, 10]
    assert res["final_eval_loss"] < res["curve"][0]["eval_loss"]
    assert res["bytes_sent_per_worker"] == steps * 2 * (2 - 1) / 2 * res["num_params"] * 4


def test_codec_transform_none_is_exactly_no_transform():
    """The 'none' (fp32) codec through codec_transform reproduces the untransformed run bit for bit;
    a lossy codec (int4, with error feedback) still trains and is counted at its bits per value."""
    torch.set_num_threads(1)
    corpus, steps, H, k = _corpus(), 6, 2, 2
    inner = InnerConfig(warmup_steps=1, total_steps=steps)
    outer = OuterConfig(lr=0.7, momentum=0.9)
    common = dict(workers=k, steps=steps, H=H, seed=1, keep_model=True)
    plain = run_diloco(corpus, MODEL, inner, outer, **common)
    codec = get_codec(CodecConfig(name="none"))
    coded = run_diloco(corpus, MODEL, inner, outer, transform=codec_transform(codec, k),
                       bytes_per_value=codec.info.bits_per_value / 8, **common)
    assert coded["final_eval_loss"] == plain["final_eval_loss"]
    assert coded["bytes_sent_per_worker"] == plain["bytes_sent_per_worker"]
    for a, b in zip(coded["model"].parameters(), plain["model"].parameters()):
        assert torch.equal(a, b)

    int4 = get_codec(CodecConfig(name="int4"))
    lossy = run_diloco(corpus, MODEL, inner, outer, transform=codec_transform(int4, k),
                       bytes_per_value=int4.info.bits_per_value / 8, **common)
    assert lossy["final_eval_loss"] < lossy["curve"][0]["eval_loss"]
    assert lossy["bytes_sent_per_worker"] == plain["bytes_sent_per_worker"] * int4.info.bits_per_value / 32
