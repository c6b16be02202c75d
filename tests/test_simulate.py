"""The in-process DiLoCo / data-parallel simulation (swarmloco.sim.simulate)."""

from __future__ import annotations

import hashlib
import math

import torch

import pytest

from swarmloco.compression import hadamard
from swarmloco.compression.registry import get_codec
from swarmloco.config import CodecConfig, DataConfig, InnerConfig, ModelConfig, OuterConfig
from swarmloco.data.text import Corpus
from swarmloco.app.inner_loop import InnerTrainer
from swarmloco.models.gpt import GPT
from swarmloco.sim.simulate import (
    allreduce_bytes_per_worker, codec_transform, run_data_parallel, run_diloco, worker_streams,
)

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
    coded = run_diloco(corpus, MODEL, inner, outer, transform=codec_transform(CodecConfig(name="none"), k),
                       bytes_per_value=codec.info.bits_per_value / 8, **common)
    assert coded["final_eval_loss"] == plain["final_eval_loss"]
    assert coded["bytes_sent_per_worker"] == plain["bytes_sent_per_worker"]
    for a, b in zip(coded["model"].parameters(), plain["model"].parameters()):
        assert torch.equal(a, b)

    int4 = get_codec(CodecConfig(name="int4"))
    lossy = run_diloco(corpus, MODEL, inner, outer, transform=codec_transform(CodecConfig(name="int4"), k),
                       bytes_per_value=int4.info.bits_per_value / 8, **common)
    assert lossy["final_eval_loss"] < lossy["curve"][0]["eval_loss"]
    assert lossy["bytes_sent_per_worker"] == plain["bytes_sent_per_worker"] * int4.info.bits_per_value / 32


# ----- the simulator against a hand-written DiLoCo (Douillard et al. 2023, Algorithm 1) -----------------

def _mean_of_workers(deltas: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per tensor, the workers' values summed in worker order, then divided by their number."""
    out = []
    for j in range(len(deltas[0])):
        acc = deltas[0][j].clone()
        for w in range(1, len(deltas)):
            acc = acc + deltas[w][j]
        out.append(acc / len(deltas))
    return out


def _mean_over_senders(deltas):
    """Sparse payloads (SparseLoCo's reference: ``scatter_reduce(mean)``): per coordinate, the workers'
    values summed in worker order, divided by how many of them sent it (non-zero); 0 if none did."""
    out = []
    for j in range(len(deltas[0])):
        acc, senders = deltas[0][j].clone(), (deltas[0][j] != 0).float()
        for w in range(1, len(deltas)):
            acc, senders = acc + deltas[w][j], senders + (deltas[w][j] != 0).float()
        out.append(torch.where(senders > 0, acc / senders.clamp_min(1), 0.0))
    return out


def _hadamard_matrix(n: int) -> torch.Tensor:
    """Sylvester's construction, orthonormal, times the documented signs (bit i of SHAKE-128 of the label,
    LSB first; 1 means -1) on the rows: ``x @ M`` turns a chunk, ``y @ M.T`` turns it back."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    raw = hashlib.shake_128(b"swarmloco rotate signs v1").digest(n // 8 or 1)
    signs = torch.tensor([-1.0 if raw[i // 8] >> (i % 8) & 1 else 1.0 for i in range(n)], dtype=torch.float64)
    return signs[:, None] * h / n ** 0.5


def _rotate_one_bit(x: torch.Tensor, chunk: int, every: int, rnd: int, basis: str = "coords") -> torch.Tensor:
    """The rotate codec's round trip, written out: of each ``chunk`` values every ``every``-th from offset
    ``(rnd + chunk index) mod every`` (all of a tensor shorter than a chunk), each as its sign times the
    chunk's mean |value| sent, rounded to bf16; 0 elsewhere. ``hadamard``: the same of each whole chunk's
    coefficients in the turned basis (a dense matrix product here, in float64), turned back."""
    if basis == "hadamard" and x.numel() >= chunk:
        flat = x.reshape(-1).clone()
        full = flat.numel() // chunk * chunk
        m = _hadamard_matrix(chunk)
        flat[:full] = (flat[:full].view(-1, chunk).double() @ m).float().reshape(-1)
        out = _rotate_one_bit(flat, chunk, every, rnd).reshape(-1)
        out[:full] = (out[:full].view(-1, chunk).double() @ m.T).float().reshape(-1)
        return out.view_as(x)
    flat, out = x.reshape(-1), torch.zeros(x.numel())
    spans = [(0, flat.numel(), 0, 1)] if flat.numel() < chunk else [
        (s, min(s + chunk, flat.numel()), (rnd + c) % every, every) for c, s in enumerate(range(0, flat.numel(), chunk))]
    for start, stop, off, stride in spans:
        vals = flat[start + off: stop: stride]
        if vals.numel():
            level = vals.abs().double().mean().to(torch.bfloat16).float()
            out[start + off: stop: stride] = torch.where(vals < 0, -level, level)
    return out.view_as(x)


def _hadtopk_one_bit(x: torch.Tensor, chunk: int, fraction: float) -> torch.Tensor:
    """The hadtopk codec's round trip, written out: each whole chunk turned, its ``ceil(fraction * chunk)``
    largest |coefficients| as their signs times their mean |value| rounded to bf16, 0 elsewhere, turned back; a
    tail keeps ``ceil(fraction * its length)`` of its own values, a tensor shorter than a chunk is sent whole
    (signs times its mean |value|). The turn is the codec's own butterflies (checked against the signed
    Sylvester matrix in test_rotate_codec.py): pseudo-gradients of AdamW steps hold many near-equal
    magnitudes, so float64 coefficients would pick other ones than float32 and the runs would part."""
    flat, out = x.reshape(-1), torch.zeros(x.numel())
    for start in range(0, flat.numel(), chunk):
        part = flat[start: start + chunk]
        whole = part.numel() == chunk
        z = hadamard.rotate(part.view(1, -1)).view(-1) if whole else part
        keep = part.numel() if flat.numel() < chunk else math.ceil(round(fraction * part.numel(), 9))
        idx = z.abs().topk(keep).indices
        level = z[idx].abs().double().mean().to(torch.bfloat16).float()
        sent = torch.zeros_like(z)
        sent[idx] = torch.where(z[idx] < 0, -level, level)
        out[start: start + chunk] = hadamard.unrotate(sent.view(1, -1)).view(-1) if whole else sent
    return out.view_as(x)


def _reference_diloco(corpus, inner, outer: OuterConfig, codec: CodecConfig | None, *, workers, steps, H, seed):
    """DiLoCo written out from the paper, independently of swarmloco's outer optimizer, simulator and error
    feedback (the inner AdamW is swarmloco's InnerTrainer: the outer loop is what is checked):

        for each round:  each worker i: theta_i <- AdamW^H(theta);  delta_i = theta - theta_i
                         [codec: e_i <- beta * e_i + delta_i;  delta_i <- C(e_i);  e_i <- e_i - delta_i]
                         [rotate, hadtopk: r_i <- delta_i - C_round(delta_i);  delta_i <- C_round(delta_i)]
                         delta = mean_i delta_i  (top-k, rotate's coords basis: per coordinate, over the
                                                  workers that sent it)
                         m <- mu * m + delta (m = delta at the first round)
                         theta <- theta - lr * (delta + mu * m)  (Nesterov) | theta - lr * m  (heavy ball)
                                  | theta - lr * delta  (mu = 0: SparseLoCo's plain SGD)
                         each worker i: theta_i <- theta  (rotate, hadtopk: theta - r_i, the unsent rest kept)
    """
    theta = [p.detach().clone() for p in GPT(MODEL, seed=seed).parameters()]
    locals_ = [GPT(MODEL, seed=seed) for _ in range(workers)]
    trainers = [InnerTrainer(m, inner, torch.device("cpu")) for m in locals_]
    streams = worker_streams(corpus, list(range(workers)), seed)
    coder = get_codec(codec) if codec is not None else None
    beta = codec.topk_decay if codec is not None and codec.name == "topk" else 1.0
    errors = [[torch.zeros_like(t) for t in theta] for _ in range(workers)]
    rotate = codec is not None and codec.name in ("rotate", "hadtopk")  # (the rest kept in the model)
    momentum = None
    done = rnd = 0
    while done < steps:
        n = min(H, steps - done)
        deltas = []
        for i in range(workers):
            trainers[i].train(streams[i], n)
            delta = [g - p.detach() for g, p in zip(theta, locals_[i].parameters())]
            if rotate:
                sent = [_rotate_one_bit(d, codec.rotate_chunk, codec.rotate_every, rnd, codec.rotate_basis)
                        if codec.name == "rotate" else _hadtopk_one_bit(d, codec.hadtopk_chunk, codec.hadtopk_fraction)
                        for d in delta]
                errors[i] = [d - s for d, s in zip(delta, sent)]
                delta = sent
            elif coder is not None:
                # e <- beta * e + delta, as one fused multiply-add (as torch.add(alpha=) computes it)
                errors[i] = [torch.add(d, e, alpha=beta) for d, e in zip(delta, errors[i])]
                delta = [coder.decode(coder.encode(e.reshape(-1)), e.numel()).view_as(e) for e in errors[i]]
                errors[i] = [e - d for e, d in zip(errors[i], delta)]
            deltas.append(delta)
        per_sender = codec is not None and (codec.name == "topk"
                                            or codec.name == "rotate" and codec.rotate_basis == "coords")
        mean = _mean_over_senders(deltas) if per_sender else _mean_of_workers(deltas)
        mu, lr = outer.momentum, outer.lr
        if mu > 0:
            momentum = [d.clone() for d in mean] if momentum is None else [mu * m + d for m, d in zip(momentum, mean)]
            step = [torch.add(d, m, alpha=mu) for d, m in zip(mean, momentum)] if outer.nesterov else momentum
        else:
            step = mean
        theta = [torch.add(t, s, alpha=-lr) for t, s in zip(theta, step)]
        for m, rest in zip(locals_, errors):
            with torch.no_grad():
                for p, t, r in zip(m.parameters(), theta, rest):
                    p.copy_(t - r if rotate else t)
        done, rnd = done + n, rnd + 1
    return theta


OUTER_SETTINGS = [
    OuterConfig(lr=0.7, momentum=0.9, nesterov=True),  # DiLoCo's
    OuterConfig(),  # the run default
    OuterConfig(lr=1.0, momentum=0.5, nesterov=True),
    OuterConfig(lr=0.8, momentum=0.9, nesterov=False),  # heavy ball
    OuterConfig(lr=1.0, momentum=0.0, nesterov=False),  # plain averaging (FedAvg)
]


@pytest.mark.parametrize("outer, codec", [(o, None) for o in OUTER_SETTINGS] + [
    (OuterConfig(lr=1.0, momentum=0.0, nesterov=False), CodecConfig(name="topk", topk_chunk=64)),  # SparseLoCo
    (OuterConfig(lr=2.0, momentum=0.0, nesterov=False), CodecConfig(name="topk", topk_chunk=256, topk_decay=0.9)),
    (OuterConfig(), CodecConfig(name="int8")),
    (OuterConfig(), CodecConfig(name="rotate", rotate_chunk=64, rotate_every=4, rotate_basis="coords")),
    (OuterConfig(lr=0.8, momentum=0.9), CodecConfig(name="rotate", rotate_chunk=96, rotate_every=3,
                                                    rotate_basis="coords")),
    (OuterConfig(), CodecConfig(name="rotate", rotate_chunk=64, rotate_every=4)),  # hadamard: the default basis
    (OuterConfig(lr=0.8, momentum=0.9), CodecConfig(name="rotate", rotate_chunk=128, rotate_every=2)),
    (OuterConfig(lr=2.0, momentum=0.5), CodecConfig(name="hadtopk", hadtopk_chunk=64, hadtopk_fraction=0.1)),
    (OuterConfig(), CodecConfig(name="hadtopk", hadtopk_chunk=128, hadtopk_fraction=0.05)),
], ids=lambda v: (f"rotate-{v.rotate_basis}" if v.name == "rotate" else v.name) if isinstance(v, CodecConfig) else "fp32" if v is None else
   f"{'nesterov' if v.nesterov else 'heavy' if v.momentum else 'sgd'}-lr{v.lr:g}-m{v.momentum:g}")
def test_simulated_diloco_is_the_papers_algorithm(outer, codec):
    """The simulator's DiLoCo (which uses the peer's outer optimizer and error feedback) against the
    hand-written reference above: the same global parameters, bit for bit, after 3 rounds of 3 workers
    (the last one short), for every outer setting, for SparseLoCo's sparse scheme and for the rotate and
    hadtopk codecs (their rest kept in each worker's parameters). rotate's hadamard basis turns chunks with
    butterflies where the reference multiplies by the matrix in float64: equal up to float32 rounding there."""
    torch.set_num_threads(1)
    corpus, steps, H, k = _corpus(), 8, 3, 3
    inner = InnerConfig(warmup_steps=2, total_steps=steps)
    res = run_diloco(corpus, MODEL, inner, outer, workers=k, steps=steps, H=H, seed=5, keep_model=True,
                     transform=codec_transform(codec, k) if codec is not None else None)
    want = _reference_diloco(corpus, inner, outer, codec, workers=k, steps=steps, H=H, seed=5)
    assert res["syncs"] == 3
    exact = codec is None or codec.name != "rotate" or codec.rotate_basis == "coords"
    for (name, got), ref in zip(res["model"].named_parameters(), want):
        if exact:
            assert torch.equal(got, ref), f"{name} differs by {(got - ref).abs().max().item()}"
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert res["final_eval_loss"] < res["curve"][0]["eval_loss"]


def test_workers_sharing_a_shard_draw_different_batches():
    """IID data: every worker on the one shard of the whole training set, each with its own stream; a
    worker alone on its shard keeps the stream seed the data-parallel arm uses."""
    corpus = _corpus()
    a, b = (next(s)[0] for s in worker_streams(corpus, [0, 0], seed=1))
    assert not torch.equal(a, b)
    solo = next(worker_streams(corpus, [2], seed=1)[0])[0]
    assert torch.equal(solo, next(corpus.train_batches(2, stream_seed=1))[0])


# ----- overlapped rounds and streaming fragments against a hand-written reference -----------------------

def _reference_overlap(corpus, inner, outer: OuterConfig, codec: CodecConfig | None, *, workers, steps, H, seed,
                       parts):
    """The overlap and fragment rules of ARCHITECTURE.md written out one inner step at a time, independently of
    swarmloco's simulator, outer optimizer, proxy and merge code (``parts``: the fragments' parameter indices):

        after inner step t:  the rounds in flight that started tau steps ago land (several with tau > H/F):
                                 theta_f <- Nesterov(theta_f, avg)       (m_f <- mu m_f + avg; d = avg + mu m_f)
                                 local_f <- alpha local_f + (theta_f - alpha p)   (blocking: local_f <- theta_f)
                             every H/F steps (and at the last step) round s starts on fragment f = parts[s % F]:
                                 delta = theta_f - local_f;  [codec with error feedback per parameter]
                                 p = local_f (delayed)  |  p = theta_f - lr (delta + mu (mu m_f + delta)) (eager),
                                 local_f <- p;  avg = mean of the workers' deltas
                             at the last step the rounds in flight land first, the round started then at once
    """
    theta = [p.detach().clone() for p in GPT(MODEL, seed=seed).parameters()]
    locals_ = [GPT(MODEL, seed=seed) for _ in range(workers)]
    trainers = [InnerTrainer(m, inner, torch.device("cpu")) for m in locals_]
    streams = worker_streams(corpus, list(range(workers)), seed)
    coder = get_codec(codec) if codec is not None else None
    errors = [[torch.zeros_like(t) for t in theta] for _ in range(workers)]
    momentum: dict[int, torch.Tensor] = {}
    mu, lr, alpha, F = outer.momentum, outer.lr, outer.overlap_alpha, outer.fragments
    phase = H // F
    tau = 0 if outer.overlap == "none" else (outer.overlap_steps or phase)
    inflight = []  # (land_at, fragment indices, proxies per worker, avg), oldest first

    def land(frag, proxies, avg):
        for j, i in enumerate(frag):
            momentum[i] = avg[j].clone() if i not in momentum else mu * momentum[i] + avg[j]
            theta[i] = torch.add(theta[i], torch.add(avg[j], momentum[i], alpha=mu), alpha=-lr)
        for w, m in enumerate(locals_):
            params = list(m.parameters())
            with torch.no_grad():
                for j, i in enumerate(frag):
                    if tau == 0:
                        params[i].copy_(theta[i])
                    else:
                        params[i].copy_(params[i] * alpha + torch.sub(theta[i], proxies[w][j], alpha=alpha))

    s = 0
    for t in range(1, steps + 1):
        for trainer, stream in zip(trainers, streams):
            trainer.train(stream, 1)
        while inflight and t == inflight[0][0]:
            land(*inflight.pop(0)[1:])
        if t % phase and t != steps:
            continue
        while inflight and t == steps:  # the run ends before they were due: they land first
            land(*inflight.pop(0)[1:])
        frag = parts[s % F]
        s += 1
        proxies, deltas = [], []
        for w, m in enumerate(locals_):
            params = list(m.parameters())
            delta = [theta[i] - params[i].detach() for i in frag]
            if outer.overlap == "eager":
                proxy = []
                for j, i in enumerate(frag):
                    buf = delta[j].clone() if i not in momentum else mu * momentum[i] + delta[j]
                    proxy.append(torch.add(theta[i], torch.add(delta[j], buf, alpha=mu), alpha=-lr))
                with torch.no_grad():
                    for j, i in enumerate(frag):
                        params[i].copy_(proxy[j])
            else:
                proxy = [params[i].detach().clone() for i in frag]
            proxies.append(proxy)
            if coder is not None:
                sent = []
                for j, i in enumerate(frag):
                    e = torch.add(delta[j], errors[w][i], alpha=1.0)
                    d = coder.decode(coder.encode(e.reshape(-1)), e.numel()).view_as(e)
                    errors[w][i] = e - d
                    sent.append(d)
                delta = sent
            deltas.append(delta)
        avg = _mean_of_workers(deltas)
        inflight.append((t + tau, frag, proxies, avg))
        if tau == 0 or t == steps:
            land(*inflight.pop()[1:])
    return theta, [list(m.parameters()) for m in locals_]


OVERLAP_SETTINGS = [
    (OuterConfig(overlap="delayed"), None, 3),  # tau = the whole phase
    (OuterConfig(overlap="delayed", overlap_steps=1, overlap_alpha=0.5), None, 3),
    (OuterConfig(overlap="eager", overlap_steps=2), None, 3),
    (OuterConfig(overlap="eager", overlap_alpha=0.0, lr=0.7, momentum=0.9), None, 3),
    (OuterConfig(fragments=2), None, 4),  # streaming DiLoCo, blocking
    (OuterConfig(overlap="delayed", fragments=2, overlap_steps=1, overlap_alpha=0.5), None, 4),
    (OuterConfig(overlap="eager", fragments=3), None, 6),
    (OuterConfig(overlap="delayed", fragments=2), CodecConfig(name="int8", block_size=64), 4),
    (OuterConfig(overlap="delayed", fragments=3, overlap_steps=5), None, 6),  # up to 3 rounds in flight
    (OuterConfig(overlap="eager", fragments=2, overlap_steps=6, overlap_alpha=0.5), None, 6),  # tau = H
]


@pytest.mark.parametrize("outer, codec, H", OVERLAP_SETTINGS,
                         ids=lambda v: f"{v.overlap}-F{v.fragments}-tau{v.overlap_steps}-a{v.overlap_alpha:g}"
                         if isinstance(v, OuterConfig) else v.name if isinstance(v, CodecConfig) else str(v))
def test_overlapped_and_streaming_rounds_follow_the_documented_rule(outer, codec, H):
    """The simulator's delayed / eager / fragment rounds (the peer's proxy, landing and fragment code) against
    the hand-written reference above: the same global parameters and the same local models of every worker,
    bit for bit, over runs whose last round is short and lands early."""
    from swarmloco.outer_optim.overlap import fragment_partition

    torch.set_num_threads(1)
    corpus, steps, k = _corpus(), 2 * H + H // 2 + 1, 3
    inner = InnerConfig(warmup_steps=2, total_steps=steps)
    names, numels = zip(*((n, p.numel()) for n, p in GPT(MODEL, seed=0).named_parameters()))
    parts = fragment_partition(names, numels, outer.fragments)
    res = run_diloco(corpus, MODEL, inner, outer, workers=k, steps=steps, H=H, seed=5, keep_model=True,
                     keep_locals=True, transform=codec_transform(codec, k) if codec is not None else None)
    theta, locals_ = _reference_overlap(corpus, inner, outer, codec, workers=k, steps=steps, H=H, seed=5,
                                        parts=parts)
    assert res["syncs"] == -(-steps // (H // outer.fragments))
    for (name, got), ref in zip(res["model"].named_parameters(), theta):
        assert torch.equal(got, ref), f"global {name} differs by {(got - ref).abs().max().item()}"
    for w, (model, ref_params) in enumerate(zip(res["locals"], locals_)):
        for (name, got), ref in zip(model.named_parameters(), ref_params):
            assert torch.equal(got, ref), f"worker {w}'s {name} differs by {(got - ref).abs().max().item()}"


def test_fragments_are_whole_layers_balanced_by_size():
    from swarmloco.outer_optim.overlap import fragment_partition, layer_key

    assert layer_key("transformer.h.3.attn.c_attn.weight") == "transformer.h.3"
    assert layer_key("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert layer_key("0.bias") == "0" and layer_key("lm_head.weight") == "lm_head" and layer_key("w") == "w"
    names = ["wte.weight", "h.0.a.weight", "h.0.a.bias", "h.1.a.weight", "h.1.a.bias", "h.2.a.weight", "ln_f.weight"]
    sizes = [50, 30, 2, 30, 2, 30, 4]
    parts = fragment_partition(names, sizes, 3)
    assert parts == ((0,), (1, 2, 5), (3, 4, 6))  # 50 | 32 + 30 | 32 + 4: every layer whole, every index once
    assert fragment_partition(names, sizes, 1) == (tuple(range(7)),)
    with pytest.raises(ValueError, match="only 5 layer"):
        fragment_partition(names, sizes, 6)
