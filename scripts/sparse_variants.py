"""Where the sparse exchange loses quality: SparseLoCo against variants of it, in the simulator.

A research driver for issue 15's target (a sparse exchange within +0.5% of dense DiLoCo at >= 100x fewer
bytes per round than fp32 pseudo-gradients; at H=30 it led to the ``hadtopk`` codec). Same setup as
``bench_quality.py``'s first suite (K=4, the 0.12M model, contiguous shards, 2000 inner steps at H=30: 67
rounds, seed 0; ``--H 10``: 200 rounds), so the figures compare with its dense DiLoCo arm (held-out 1.6427 at
H=30, 1.6205 at H=10). Each variant is a :data:`PseudoGradTransform` for
:func:`swarmloco.sim.simulate.run_diloco`, from three choices:

* **what is sent**: ``topk`` (the ``topk`` codec: SparseLoCo's 64 of 4096, 2 bits, Elias-Fano indices;
  averaged per coordinate over its senders), or a schedule every worker shares, so no index is sent and
  the payloads line up: ``stride`` (of each chunk, every ``S``-th coordinate, shifted by one each round:
  each coordinate is sent every ``S`` rounds), ``random`` (a fresh shared random ``1/S`` of each chunk per
  round), ``all``; or ``stagger`` (``stride`` with worker ``w`` ``w`` rounds ahead: at K=S the workers send
  disjoint shares, averaged over the whole group), ``hadamard`` (``stride`` of each whole chunk's
  coefficients after a fixed random-sign Walsh-Hadamard rotation, turned back after: what the ``rotate``
  codec's default basis does), ``hadstagger`` (both); or ``hadtopk`` (each worker's own ``k`` largest of each
  chunk's rotated coefficients, Elias-Fano positions counted at ``2 + ceil(log2(chunk / k))`` bits each,
  averaged over the whole group: what the ``hadtopk`` codec does); ``signs`` seeds the rotation's signs;
* **the values**: ``bits`` 1 (sign, with one bf16 magnitude per chunk: the mean |value| sent), 2 (Lloyd-Max
  levels for a Gaussian, one bf16 RMS per chunk) or 32;
* **where the unsent rest goes**: ``feedback`` (the error-feedback accumulator, decayed by ``decay``:
  SparseLoCo's, the engine's) or ``model``: the worker keeps it in its own parameters (after the outer
  step its parameters are the new global ones minus the rest), so it trains on from where it was instead
  of re-learning the unsent part from the global parameters every round (then added again to the
  accumulator: the duplication that makes ``random`` with ``feedback`` diverge).

``hadamard4-1bit-model`` is what the engine's ``rotate`` codec does (``codec.name = "rotate"``: the held-out loss of
``bench_quality.py``'s ``H{H}-n1/0.7-rotate`` arms), ``stride4-1bit-model`` what it does with ``rotate_basis =
"coords"`` (``...-rotate-coords``; the Hadamard signs differ here: a torch generator, not the codec's SHAKE-128
ones); this script keeps its own implementation of all
the variants and patches the simulator's landing (``_SimRound.land``) for the "rest in model" ones. Tensors
shorter than a chunk are sent whole with the variant's values. Bytes are exact for ``topk`` (the codec's
payloads) and counted bit for bit for the others (values plus 2 bytes of level per
chunk; no header). Results and curves: ``--out`` (JSON; ``final_eval_loss_workers_mean`` is the held-out loss
of the workers' mean model at the end: the global one minus the mean rest); a table on stdout.

    python scripts/sparse_variants.py                      # every variant, 2 at a time (~35 min on 2 cores)
    python scripts/sparse_variants.py --variants stride4-1bit-model all-1bit-model
    python scripts/sparse_variants.py --variants stride4-1bit-model --outer n1/0.8 sgd3   # other outer steps
    python scripts/sparse_variants.py --variants hadtopk144-1bit-model hadamard4-1bit-model --outer n2/0.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import replace
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402  (the first suite's setup)

from swarmloco.compression.error_feedback import ErrorFeedback  # noqa: E402
from swarmloco.compression.registry import get_codec  # noqa: E402
from swarmloco.config import CodecConfig, OuterConfig  # noqa: E402
from swarmloco.data.text import Corpus  # noqa: E402
from swarmloco.sim import simulate as sim  # noqa: E402

CHUNK = 4096
DENSE_DILOCO = {30: 1.6427, 10: 1.6205}  # bench_quality's 2000:H{H}-n1/0.7 (BENCHMARKS.md)


@dataclass(frozen=True)
class Variant:
    name: str
    select: str  # topk | stride | stagger | random | all
    every: int = 4  # stride / random: a coordinate is sent every ``every`` rounds (1 / density)
    bits: int = 1  # 1 or 32 (topk: the codec's 2)
    rest: str = "model"  # feedback | model
    decay: float = 1.0  # of the feedback accumulator (rest = feedback)
    lr: float = 1.0
    momentum: float = 0.7
    nesterov: bool = True
    k: int = 0  # hadtopk: the coefficients sent per chunk (its largest by magnitude)
    signs: int = 12345  # the seed of the rotation's random signs


VARIANTS = {v.name: v for v in [
    Variant("sparseloco", "topk", bits=2, rest="feedback", decay=0.95, lr=2.0, momentum=0.0, nesterov=False),
    Variant("topk-model", "topk", bits=2, rest="model"),
    Variant("random4-1bit-model", "random"),
    Variant("stride4-1bit-model", "stride"),
    Variant("stride4-fp32-model", "stride", bits=32),
    Variant("stagger4-1bit-model", "stagger"),
    Variant("stagger4-fp32-model", "stagger", bits=32),
    Variant("hadamard4-1bit-model", "hadamard"),
    Variant("hadamard4-fp32-model", "hadamard", bits=32),
    Variant("hadstagger4-1bit-model", "hadstagger"),
    Variant("hadamard8-2bit-model", "hadamard", every=8, bits=2),
    Variant("hadamard1-1bit-model", "hadamard", every=1),
    Variant("hadamard4-1bit-model-s1", "hadamard", signs=1),
    Variant("hadamard4-1bit-model-s2", "hadamard", signs=2),
    Variant("hadtopk144-1bit-model", "hadtopk", k=144),
    Variant("hadtopk144-1bit-model-s1", "hadtopk", k=144, signs=1),
    Variant("hadtopk144-1bit-model-s2", "hadtopk", k=144, signs=2),
    Variant("hadtopk96-2bit-model", "hadtopk", k=96, bits=2),
    Variant("all-1bit-model", "all", every=1),
    Variant("stride4-1bit-feedback", "stride", rest="feedback"),
]}


def one_bit(values: torch.Tensor) -> torch.Tensor:
    """Sign times the mean |value| (rounded to bf16): what 1 bit per value and one level carry."""
    level = values.abs().mean().to(torch.bfloat16).float()
    return torch.where(values < 0, -level, level)


LLOYD_MAX_2BIT = (0.9816, 0.4528, 1.510)  # threshold, inner and outer level / RMS (a Gaussian's optimum)


def two_bit(values: torch.Tensor) -> torch.Tensor:
    """2 bits per value (Lloyd-Max for a Gaussian: 4 levels) with one bf16 RMS per chunk."""
    rms = values.pow(2).mean().sqrt().to(torch.bfloat16).float()
    t, inner, outer = LLOYD_MAX_2BIT
    mag = torch.where(values.abs() < t * rms, inner * rms, outer * rms)
    return torch.where(values < 0, -mag, mag)


QUANTIZERS = {1: one_bit, 2: two_bit}


def shared_mask(v: Variant, numel: int, key: int, rnd: int) -> torch.Tensor:
    """Which of a tensor's values every worker sends in round ``rnd`` (the same on every worker)."""
    if v.select == "all" or numel < CHUNK:
        return torch.ones(numel, dtype=torch.bool)
    mask = torch.zeros(numel, dtype=torch.bool)
    gen = torch.Generator().manual_seed(1_000_003 * rnd + key)
    for c, start in enumerate(range(0, numel, CHUNK)):
        n = min(CHUNK, numel - start)
        if v.select in ("stride", "stagger", "hadamard", "hadstagger"):
            mask[start + (rnd + c) % v.every: start + n: v.every] = True
        else:
            mask[start + torch.randperm(n, generator=gen)[: -(-n // v.every)]] = True
    return mask


_BASIS: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def basis(n: int, seed: int = 12345) -> tuple[torch.Tensor, torch.Tensor]:
    """(an orthonormal Hadamard matrix of order n, a fixed random sign per row): a shared rotation."""
    if (n, seed) not in _BASIS:
        h = torch.ones(1, 1)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
        _BASIS[(n, seed)] = (h / n ** 0.5, signs)
    return _BASIS[(n, seed)]


def shared_roundtrip(v: Variant, x: torch.Tensor, key: int, rnd: int) -> tuple[torch.Tensor, int]:
    """(what the receivers decode, bits sent) for a shared-schedule variant."""
    if v.select in ("hadamard", "hadstagger", "hadtopk") and x.numel() >= CHUNK:
        flat = x.reshape(-1)
        full = flat.numel() // CHUNK * CHUNK
        h, d = basis(CHUNK, v.signs)
        y = (flat[:full].view(-1, CHUNK) * d) @ h  # each chunk in the rotated basis
        inner = "ktop" if v.select == "hadtopk" else "stride"
        yhat, bits = shared_roundtrip(replace(v, select=inner), y.reshape(-1), key, rnd)
        out = torch.empty_like(flat)
        out[:full] = ((yhat.view(-1, CHUNK) @ h) * d).reshape(-1)
        if full < flat.numel():
            tail, tbits = shared_roundtrip(replace(v, select="stride"), flat[full:], key, rnd)
            out[full:], bits = tail, bits + tbits
        return out.view_as(x), bits
    flat = x.reshape(-1)
    if v.select == "ktop":  # each chunk's k largest: positions differ per worker (Elias-Fano: 2 + log2(n/k) each)
        out = torch.zeros_like(flat)
        bits = 0
        for start in range(0, flat.numel(), CHUNK):
            vals = flat[start: start + CHUNK]
            idx = vals.abs().topk(v.k).indices
            out[start + idx] = vals[idx] if v.bits == 32 else QUANTIZERS[v.bits](vals[idx])
            bits += v.k * (v.bits + 2 + math.ceil(math.log2(vals.numel() / v.k))) + 16
        return out.view_as(x), bits
    mask = shared_mask(v, flat.numel(), key, rnd)
    out = torch.zeros_like(flat)
    bits = 0
    for start in range(0, flat.numel(), CHUNK):
        m = mask[start: start + CHUNK]
        vals = flat[start: start + CHUNK][m]
        out[start: start + CHUNK][m] = vals if v.bits == 32 else QUANTIZERS[v.bits](vals)
        bits += vals.numel() * v.bits + (16 if v.bits < 32 else 0)
    return out.view_as(x), bits


class Transform:
    """The variant's per-worker exchange; ``rests[(worker, key)]`` is what stayed with the worker."""

    def __init__(self, v: Variant, workers: int):
        self.v, self.rounds, self.bits = v, [0] * workers, 0
        self.codec = get_codec(CodecConfig(name="topk")) if v.select == "topk" else None
        self.feedback = [ErrorFeedback(v.decay) for _ in range(workers)]
        self.rests: dict[tuple[int, int], torch.Tensor] = {}
        self.sparse = v.select == "topk"  # top-k payloads: each coordinate over its senders

    def __call__(self, worker: int, tensors, keys=None, step=None):
        out = []
        for key, t in zip(range(len(tensors)) if keys is None else keys, tensors):
            x = self.feedback[worker].compensate(key, t) if self.v.rest == "feedback" else t.detach().float()
            if self.codec is not None:
                sent = self.codec.roundtrip(x)
                bits = 8 * self.codec.payload_size(x.numel())
            else:
                rnd = self.rounds[worker] + (worker if self.v.select in ("stagger", "hadstagger") else 0)
                sent, bits = shared_roundtrip(self.v, x, key, rnd)
            if self.v.rest == "feedback":
                self.feedback[worker].update(key, x, sent)
            else:
                self.rests[(worker, key)] = x - sent
            self.bits += bits if worker == 0 else 0
            out.append(sent)
        self.rounds[worker] += 1
        return out


def keep_rest_in_model(transform: Transform) -> None:
    """Patch the simulator's (blocking) landing: worker w's parameters = the new global ones - its rest."""
    def land(self, outer, global_params, local_models) -> None:
        theta = [global_params[i] for i in self.index]
        sim.apply_outer_step(outer, theta, self.averaged)
        with torch.no_grad():
            for w, model in enumerate(local_models):
                local = list(model.parameters())
                for i, t in zip(self.index, theta):
                    local[i].copy_(t).sub_(transform.rests[(w, i)])
    sim._SimRound.land = land


def run(v: Variant, steps: int, H: int) -> dict:
    torch.set_num_threads(1)
    args = bq.parse_args([])
    model_cfg, data_cfg = bq.configs(args)
    corpus = Corpus(data_cfg, model_cfg.block_size, seed=0)
    transform = Transform(v, args.workers)
    if v.rest == "model":
        keep_rest_in_model(transform)
    outer = OuterConfig(lr=v.lr, momentum=v.momentum, nesterov=v.nesterov)
    res = sim.run_diloco(corpus, model_cfg, bq.inner_config(steps), outer, workers=args.workers, steps=steps, H=H,
                         seed=0, shards=list(range(args.workers)), transform=transform, keep_model=True,
                         keep_locals=True)
    with torch.no_grad():  # the workers' mean model: the global one minus the mean rest (rest = model)
        mean_model = res.pop("model")
        for p, *locs in zip(mean_model.parameters(), *(m.parameters() for m in res.pop("locals"))):
            p.copy_(torch.stack(locs).mean(0))
    locals_mean = sim.evaluate(mean_model, corpus.eval_batches(), torch.device("cpu"), sim.lm_loss)
    fp32 = 32 * res["num_params"] * res["syncs"]
    return {"variant": asdict(v), "final_eval_loss": res["final_eval_loss"],
            "final_eval_loss_workers_mean": locals_mean, "rounds": res["syncs"],
            "payload_bytes_per_round": transform.bits / 8 / res["syncs"], "fp32_over_payload": fp32 / transform.bits,
            "curve": res["curve"], "wall_s": res["wall_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--H", type=int, default=30)
    ap.add_argument("--outer", nargs="+", type=bq.parse_outer, default=[],
                    help="run the variants with these outer steps instead of their own (n<lr>/<mom>, sgd<lr>)")
    ap.add_argument("--dense", type=float, default=None,
                    help="dense DiLoCo's held-out loss at this H, for the last column (known: H=30, H=10)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default="runs/sparse_variants.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.read_text())["results"] if out.exists() else {}
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        variants = [VARIANTS[name] for name in args.variants]
        if args.outer:
            variants = [replace(v, name=f"{v.name}@{bq.outer_label(*o)}", lr=o[0], momentum=o[1], nesterov=o[2])
                        for v in variants for o in args.outer]
        futures = {pool.submit(run, v, args.steps, args.H): v.name for v in variants}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": args.steps, "H": args.H,
                                       "torch": torch.__version__, "results": results}, indent=1))
    dense = args.dense or DENSE_DILOCO.get(args.H)
    print("| variant | payload / round | fp32 / payload | held-out loss | vs dense DiLoCo |\n|---|---|---|---|---|")
    for name, r in results.items():
        gap = f"{100 * (r['final_eval_loss'] / dense - 1):+.2f}%" if dense else "-"
        print(f"| {name} | {r['payload_bytes_per_round']:,.0f} B | {r['fp32_over_payload']:.0f}x | "
              f"{r['final_eval_loss']:.4f} | {gap} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
