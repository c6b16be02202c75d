"""Quality benchmark: DiLoCo vs synchronous data parallelism at equal training tokens.

What the anchors measure (DiLoCo scaling laws, arXiv 2503.09799: K=4 replicas, H=30; SparseLoCo,
arXiv 2508.15706), on K simulated workers (``swarmloco.sim.simulate``), one *suite* per
``STEPS:H`` pair (default ``2000:30`` and ``4000:100``, i.e. 66 and 40 outer rounds):

* ``dp-s{seed}``: synchronous data parallel (one AdamW on a K-times batch), per ``--seeds`` (the spread);
* ``H{H}-{outer}``: DiLoCo with each outer setting of ``--grid`` (first suite) or ``--grid-other``
  (``n0.7/0.9`` = Nesterov lr 0.7, momentum 0.9; ``h1/0.5`` heavy ball; ``sgd1`` = lr 1, no momentum),
  the run's default ``[outer]`` among them;
* ``H{H}-{outer}-{codec}``: the default outer setting with each pseudo-gradient through a dense codec
  (``--codecs``; error feedback per worker, exactly as a peer does it);
* ``H{H}-topk-sgd{lr}``: SparseLoCo (``--sparse``): the ``topk`` codec (64 of every 4096 values,
  2-bit values, error feedback decaying by ``--sparse-decay``) and plain SGD outer steps at each
  ``--sparse-lr`` (the outer step the paper uses: no outer momentum, the decayed accumulator is it);
* ``H{H}-{outer}-rotate`` (``--no-rotate`` skips it): the default outer setting with the ``rotate`` codec (a
  shared rotating quarter of each chunk's coefficients after a fixed Hadamard rotation at 1 bit, the unsent
  rest kept in each worker's parameters); ``...-rotate-coords`` (``--rotate-coords``): the same codec in its
  plain basis (a quarter of the values themselves); ``--rotate-outer`` runs them at other outer settings;
* ``H{H}-{outer}-hadtopk`` (``--no-hadtopk`` skips it): the ``hadtopk`` codec (each worker's 128 largest of each
  4096 Hadamard coefficients at 1 bit, the rest kept in its parameters) at each ``--hadtopk-outer`` setting
  (default: the codec's own, ``hadtopk.TUNED_OUTER``: Nesterov lr 1.6 / momentum 0.6);
* ``...-iid`` (first suite; ``--no-iid`` skips them): DP seed 0 and the default DiLoCo with every
  worker drawing from the whole training set instead of its own contiguous shard.

Every arm sees the same inner AdamW (lr 1e-3, wd 0.1, betas 0.9/0.95, clip 1, 50 warmup steps, cosine
to 0.1x over the suite's steps) and, seed for seed, the same batches. Reported: held-out loss, the
relative gap to the DP mean at the end and along the curve, exact bytes each worker sends per round
(its codec's real payloads; all-reduce 2(n-1)/n x payload, all-gather (n-1) x payload) against fp32
DP. Raw curves go to ``--out`` (JSON), the tables to ``.md`` and the loss curves to ``.png`` beside
it (the PNG needs matplotlib: ``pip install -e '.[bench]'``; without it the PNG is skipped).

    python scripts/bench_quality.py                  # the full run: ~30 min with --jobs 2 on 2 cores
    python scripts/bench_quality.py --quick          # smoke run, < 1 min
    python scripts/bench_quality.py --suites 2000:30 --grid n0.7/0.9 --codecs --no-sparse   # one arm + DP
    bash scripts/bench_quality_gpu.sh                # 14.6M model on one GPU, H=30, 100 rounds (~9 min, H200)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import torch

from swarmloco.compression.hadtopk import TUNED_OUTER
from swarmloco.compression.registry import get_codec
from swarmloco.config import CodecConfig, DataConfig, InnerConfig, ModelConfig, OuterConfig
from swarmloco.data.text import Corpus
from swarmloco.models.gpt import GPT
from swarmloco.sim.simulate import codec_transform, ring_equivalent_bytes_per_value, run_data_parallel, run_diloco

DEFAULT_OUTER = OuterConfig()
DEFAULT_GRID = ["n0.7/0.9", "n1/0.8", "n1/0.7", "n0.7/0.7", "n1/0.5"]
OTHER_GRID = ["n0.7/0.9", "n1/0.8", "n1/0.5"]
HADTOPK_OUTER = ["n{:g}/{:g}".format(*TUNED_OUTER)]  # the codec's own default (BENCHMARKS.md: within +0.5% over 3 seeds)


@dataclass(frozen=True)
class Arm:
    """One training run of the benchmark."""

    name: str
    kind: str  # "dp" or "diloco"
    steps: int
    H: int = 0
    seed: int = 0
    iid: bool = False
    lr: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    codec: str = "none"
    decay: float = 1.0
    overlap: str = "none"
    overlap_steps: int = 0
    overlap_alpha: float = 1.0
    fragments: int = 1

    def outer(self) -> OuterConfig:
        return OuterConfig(lr=self.lr, momentum=self.momentum, nesterov=self.nesterov, overlap=self.overlap,
                           overlap_steps=self.overlap_steps, overlap_alpha=self.overlap_alpha,
                           fragments=self.fragments)

    def codec_cfg(self, chunk: int, fraction: float) -> CodecConfig:
        if self.codec == "rotate-coords":  # the rotate codec in its plain basis
            return CodecConfig(name="rotate", rotate_basis="coords")
        return CodecConfig(name=self.codec, topk_chunk=chunk, topk_fraction=fraction, topk_decay=self.decay)


def outer_label(lr: float, momentum: float, nesterov: bool) -> str:
    if momentum == 0:
        return f"sgd{lr:g}"
    return f"{'n' if nesterov else 'h'}{lr:g}/{momentum:g}"


def parse_outer(text: str) -> tuple[float, float, bool]:
    """``n0.7/0.9`` (Nesterov), ``h1/0.5`` (heavy ball) or ``sgd1`` -> (lr, momentum, nesterov)."""
    try:
        if text.startswith("sgd"):
            return float(text[3:]), 0.0, False
        if text[0] in "nh" and "/" in text:
            lr, momentum = text[1:].split("/")
            return float(lr), float(momentum), text[0] == "n"
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"outer setting {text!r}: use n<lr>/<momentum>, h<lr>/<momentum> or sgd<lr>")


def parse_overlap(text: str) -> dict:
    """``delayed``, ``eager`` or ``none``, then optional ``/fF`` (fragments), ``/tTAU`` (overlap_steps),
    ``/aALPHA`` (overlap_alpha): e.g. ``eager/t5``, ``delayed/f4/t3/a0.5`` -> Arm fields."""
    mode, *rest = text.split("/")
    out = {"overlap": mode}
    try:
        for part in rest:
            key = {"f": "fragments", "t": "overlap_steps", "a": "overlap_alpha"}[part[0]]
            out[key] = float(part[1:]) if key == "overlap_alpha" else int(part[1:])
        if mode in ("none", "delayed", "eager"):
            return out
    except (KeyError, IndexError, ValueError):
        pass
    raise argparse.ArgumentTypeError(f"overlap arm {text!r}: use none|delayed|eager[/fF][/tTAU][/aALPHA]")


def overlap_label(spec: dict) -> str:
    return "-".join([spec["overlap"]] + [f"{k[0] if k != 'overlap_steps' else 't'}{spec[k]:g}" for k in
                                         ("fragments", "overlap_steps", "overlap_alpha") if k in spec])


def parse_suite(text: str) -> tuple[int, int]:
    try:
        steps, H = (int(v) for v in text.split(":"))
        if steps > 0 and H > 0:
            return steps, H
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"suite {text!r}: use STEPS:H, e.g. 2000:30")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", type=parse_suite, nargs="+", default=[(2000, 30), (4000, 100)],
                    help="STEPS:H pairs: inner steps per worker and DiLoCo inner steps per round")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--grid", nargs="*", default=DEFAULT_GRID,
                    help="DiLoCo outer settings of the first suite (the run's default [outer] is always added)")
    ap.add_argument("--grid-other", nargs="*", default=OTHER_GRID, help="the same, for the other suites")
    ap.add_argument("--codecs", nargs="*", default=["int8", "int4"], help="dense codecs at the default outer setting")
    ap.add_argument("--no-sparse", dest="sparse", action="store_false", help="skip the SparseLoCo arms")
    ap.add_argument("--sparse-lr", type=float, nargs="+", default=[2.0],
                    help="SparseLoCo outer lr(s) (plain SGD; 2 was best of 1, 2, 3 at K=4, H=30: BENCHMARKS.md)")
    ap.add_argument("--no-rotate", dest="rotate", action="store_false", help="skip the rotate-codec arms")
    ap.add_argument("--rotate-coords", action="store_true",
                    help="also run the rotate codec in its coords basis (the default basis is hadamard)")
    ap.add_argument("--rotate-outer", nargs="*", default=[],
                    help="outer settings of the rotate arms (default: the run's default [outer])")
    ap.add_argument("--no-hadtopk", dest="hadtopk", action="store_false", help="skip the hadtopk-codec arms")
    ap.add_argument("--hadtopk-outer", nargs="*", default=HADTOPK_OUTER,
                    help="outer settings of the hadtopk arms (default: the codec's own, n1.6/0.6)")
    ap.add_argument("--sparse-decay", type=float, default=CodecConfig.topk_decay, help="error-feedback decay (beta)")
    ap.add_argument("--sparse-fraction", type=float, default=CodecConfig.topk_fraction)
    ap.add_argument("--sparse-chunk", type=int, default=CodecConfig.topk_chunk)
    ap.add_argument("--overlap", type=parse_overlap, nargs="*", default=[],
                    help="overlapped / streaming arms at the default outer setting, fp32 (issue 14): e.g. "
                         "delayed eager eager/t5 delayed/f4 (mode[/fF][/tTAU][/aALPHA])")
    ap.add_argument("--no-iid", dest="iid", action="store_false", help="skip the IID-shard arms (first suite)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="DP seeds; DiLoCo uses the first")
    ap.add_argument("--eval-batches", type=int, default=32)
    ap.add_argument("--dp-eval-every", type=int, default=100, help="DP eval cadence (DiLoCo: every round)")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="arms run in parallel (CPU)")
    ap.add_argument("--reuse", action="store_true", help="keep arms already in --out, run only missing ones")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 min)")
    ap.add_argument("--gpu", action="store_true", help="the GPU preset: 14.6M-param model (6x448, block 128), CUDA, one job")
    ap.add_argument("--out", default="runs/bench_quality.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.suites, args.grid, args.grid_other, args.codecs = [(60, 10), (80, 20)], ["n0.7/0.9"], [], ["int8"]
        args.eval_batches, args.dp_eval_every, args.n_layer, args.n_embd, args.block_size = 4, 20, 1, 32, 32
        args.batch_size = 8
        if args.out == "runs/bench_quality.json":
            args.out = "runs/bench_quality_quick.json"
    if args.gpu:
        args.device, args.jobs, args.n_layer, args.n_embd, args.n_head, args.block_size = "cuda", 1, 6, 448, 7, 128
        if args.out == "runs/bench_quality.json":
            args.out = "runs/bench_quality_gpu.json"
    return args


def build_arms(args) -> list[Arm]:
    """Every arm of the run, in the order they are worth having if a run is cut short."""
    arms = []
    default = (DEFAULT_OUTER.lr, DEFAULT_OUTER.momentum, DEFAULT_OUTER.nesterov)
    d = outer_label(*default)
    for index, (steps, H) in enumerate(args.suites):
        pre, seed = f"{steps}:", args.seeds[0]
        grid = [g for g in (parse_outer(t) for t in (args.grid if index == 0 else args.grid_other)) if g != default]

        def diloco(name: str, lr: float, momentum: float, nesterov: bool, **kw) -> Arm:
            return Arm(f"{pre}H{H}-{name}", "diloco", steps, H, seed, lr=lr, momentum=momentum, nesterov=nesterov, **kw)

        arms += [Arm(f"{pre}dp-s{s}", "dp", steps, seed=s) for s in args.seeds
                 if f"{pre}dp-s{s}" not in {a.name for a in arms}]  # suites of equal steps share their DP
        arms.append(diloco(d, *default))
        if args.sparse:
            arms += [diloco(f"topk-sgd{lr:g}", lr, 0.0, False, codec="topk", decay=args.sparse_decay)
                     for lr in args.sparse_lr]
        if args.rotate:
            for o in [parse_outer(t) for t in args.rotate_outer] or [default]:
                arms.append(diloco(f"{outer_label(*o)}-rotate", *o, codec="rotate"))
                if args.rotate_coords:
                    arms.append(diloco(f"{outer_label(*o)}-rotate-coords", *o, codec="rotate-coords"))
        if args.hadtopk:
            arms += [diloco(f"{outer_label(*o)}-hadtopk", *o, codec="hadtopk")
                     for o in (parse_outer(t) for t in args.hadtopk_outer)]
        arms += [diloco(f"{d}-{codec}", *default, codec=codec) for codec in args.codecs]
        arms += [diloco(outer_label(*g), *g) for g in grid]
        arms += [diloco(f"{d}-{overlap_label(spec)}", *default, **spec) for spec in args.overlap  # (F must divide H)
                 if H % spec.get("fragments", 1) == 0 and spec.get("overlap_steps", 0) <= H]
        if args.iid and index == 0:
            arms.append(Arm(f"{pre}dp-s{seed}-iid", "dp", steps, seed=seed, iid=True))
            arms.append(diloco(f"{d}-iid", *default, iid=True))
    assert len({a.name for a in arms}) == len(arms), "duplicate arm names"
    return arms


def configs(args):
    model = ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.block_size)
    data = DataConfig(num_shards=args.workers, batch_size=args.batch_size, eval_batches=args.eval_batches,
                      **({"max_bytes": 1_000_000} if args.quick else {}))
    return model, data


def inner_config(steps: int) -> InnerConfig:
    return InnerConfig(lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
                       warmup_steps=min(50, steps // 10), total_steps=steps)


def round_payload_bytes(codec_cfg: CodecConfig, model_cfg: ModelConfig) -> int:
    """Exact bytes of one worker's encoded pseudo-gradient (every tensor encoded on its own, as a peer does)."""
    codec = get_codec(codec_cfg)
    return sum(len(codec.encode(torch.zeros(p.numel()))) for p in GPT(model_cfg).parameters())


def run_arm(args, arm: Arm) -> dict:
    """Train one arm (in a worker process) and return its result dict."""
    torch.set_num_threads(1 if args.device == "cpu" else max(1, os.cpu_count() or 1))
    logging.basicConfig(level=logging.WARNING)
    model_cfg, data_cfg = configs(args)
    k = args.workers
    if arm.iid:
        data_cfg = replace(data_cfg, num_shards=1)
    corpus = Corpus(data_cfg, model_cfg.block_size, seed=0)
    shards = [0] * k if arm.iid else list(range(k))
    device = torch.device(args.device)
    inner = inner_config(arm.steps)
    if arm.kind == "dp":
        res = run_data_parallel(corpus, model_cfg, inner, workers=k, steps=arm.steps, seed=arm.seed, shards=shards,
                                eval_every=args.dp_eval_every, device=device)
    else:
        codec_cfg = arm.codec_cfg(args.sparse_chunk, args.sparse_fraction)
        codec = get_codec(codec_cfg)
        res = run_diloco(corpus, model_cfg, inner, arm.outer(), workers=k, steps=arm.steps, H=arm.H, seed=arm.seed,
                         shards=shards, transform=None if arm.codec == "none" else codec_transform(codec_cfg, k),
                         bytes_per_value=ring_equivalent_bytes_per_value(codec, k), device=device)
        payload = round_payload_bytes(codec_cfg, model_cfg) / arm.fragments  # (a fragment's round: 1/F of it, on average)
        share = payload * (k - 1) if not codec.info.summable else payload * 2 * (k - 1) / k
        res.update(payload_bytes=payload, round_bytes_per_worker=share, bytes_sent_per_worker=share * res["syncs"])
    res["arm"] = asdict(arm)
    return res


# ----- the report ---------------------------------------------------------------------------------

def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def gap_curve(res: dict, dp_curves: list[list[dict]]) -> list[tuple[int, float]]:
    """(step, loss / DP mean - 1) at every step where the arm and all DP seeds were evaluated."""
    dp = [{p["step"]: p["eval_loss"] for p in c} for c in dp_curves]
    out = []
    for p in res["curve"]:
        if p["step"] > 0 and all(p["step"] in d for d in dp):
            out.append((p["step"], p["eval_loss"] / statistics.mean(d[p["step"]] for d in dp) - 1))
    return out


def _gap_at(gaps: list[tuple[int, float]], step: int) -> str:
    """The gap at the last common evaluation at or before ``step`` (its step in brackets if earlier)."""
    before = [(s, g) for s, g in gaps if s <= step]
    if not before:
        return "-"
    s, g = before[-1]
    return f"{100 * g:+.2f}%" + ("" if s == step else f" ({s})")


def suite_table(results: dict, steps: int, k: int) -> list[str]:
    names = [n for n in results if n.startswith(f"{steps}:")]
    dp_names = [n for n in names if results[n]["arm"]["kind"] == "dp" and not results[n]["arm"]["iid"]]
    if not dp_names:
        return []
    dp_mean = statistics.mean(results[n]["final_eval_loss"] for n in dp_names)
    dp_curves = [results[n]["curve"] for n in dp_names]
    dp_bytes = results[dp_names[0]]["bytes_sent_per_worker"]
    fr = [steps // 4, steps // 2, 3 * steps // 4]
    rows = [f"| arm | rounds | held-out loss | Δ vs DP mean | gap @{fr[0]} | @{fr[1]} | @{fr[2]} | "
            "bytes / worker / round | DP bytes / arm bytes | wall (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        r = results[n]
        loss, gaps = r["final_eval_loss"], gap_curve(r, dp_curves)
        per_round = r.get("round_bytes_per_worker", r["bytes_sent_per_worker"] / max(1, r["syncs"]))
        ratio = f"{dp_bytes / r['bytes_sent_per_worker']:,.0f}x" if r["bytes_sent_per_worker"] else "-"
        rows.append(f"| {n.split(':', 1)[1]} | {r['syncs'] if r['arm']['kind'] == 'diloco' else '-'} | {loss:.4f} | "
                    f"{100 * (loss / dp_mean - 1):+.2f}% | {_gap_at(gaps, fr[0])} | {_gap_at(gaps, fr[1])} | "
                    f"{_gap_at(gaps, fr[2])} | {_mb(per_round)} | {ratio} | {r['wall_s']:.0f} |")
    losses = [results[n]["final_eval_loss"] for n in dp_names]
    if len(losses) > 1:
        spread = max(losses) - min(losses)
        rows.append(f"\nDP seed spread: {spread:.4f} ({100 * spread / dp_mean:.2f}% of the DP mean {dp_mean:.4f}), "
                    f"seeds {[results[n]['seed'] for n in dp_names]}")
    return rows


def grid_table(results: dict, steps: int, H: int) -> list[str]:
    """Δ vs DP mean of every plain (fp32, contiguous) DiLoCo arm of a suite, by outer setting."""
    dp = [results[n]["final_eval_loss"] for n in results
          if n.startswith(f"{steps}:") and results[n]["arm"]["kind"] == "dp" and not results[n]["arm"]["iid"]]
    arms = [results[n]["arm"] for n in results if n.startswith(f"{steps}:H{H}-")]
    plain = [a for a in arms if a["codec"] == "none" and not a["iid"] and a.get("overlap", "none") == "none"
             and a.get("fragments", 1) == 1]
    if not dp or not plain:
        return []
    ref = statistics.mean(dp)
    moms = sorted({(a["momentum"], a["nesterov"]) for a in plain})
    lrs = sorted({a["lr"] for a in plain})
    rows = ["| momentum \\ outer lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
            "|---" * (len(lrs) + 1) + "|"]
    for mom, nest in moms:
        cells = []
        for lr in lrs:
            hit = [results[a["name"]] for a in plain if a["lr"] == lr and (a["momentum"], a["nesterov"]) == (mom, nest)]
            cells.append(f"{100 * (hit[0]['final_eval_loss'] / ref - 1):+.2f}%" if hit else "")
        label = "0 (plain SGD)" if mom == 0 else f"{mom:g} {'Nesterov' if nest else 'heavy ball'}"
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def write_plot(results: dict, suites: list[tuple[int, int]], path: Path) -> bool:
    """Loss curves (top) and the gap to the DP mean (bottom), one column per suite. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed (pip install -e '.[bench]'): no plot written")
        return False
    columns = list(dict.fromkeys(s for s, _ in suites))
    fig, axes = plt.subplots(2, len(columns), figsize=(6.5 * len(columns), 8), squeeze=False)
    for col, steps in enumerate(columns):
        H = ", ".join(str(h) for s, h in suites if s == steps)
        names = [n for n in results if n.startswith(f"{steps}:")]
        dp_names = [n for n in names if results[n]["arm"]["kind"] == "dp" and not results[n]["arm"]["iid"]]
        top, bottom = axes[0][col], axes[1][col]
        all_gaps = [0.0]
        for n in names:
            r = results[n]
            xs = [p["step"] for p in r["curve"]]
            ys = [p["eval_loss"] for p in r["curve"]]
            style = "--" if r["arm"]["kind"] == "dp" else "-"
            top.plot(xs, ys, style, lw=1.2, label=n.split(":", 1)[1])
            if dp_names and n not in dp_names:
                gaps = gap_curve(r, [results[d]["curve"] for d in dp_names])
                all_gaps += [100 * g for _, g in gaps if _ >= steps // 10]
                bottom.plot([s for s, _ in gaps], [100 * g for _, g in gaps], style, lw=1.2, label=n.split(":", 1)[1])
        finals = [results[n]["final_eval_loss"] for n in names]
        if finals:
            lo = min(finals)
            top.set_ylim(lo - 0.05, lo + 0.8)
        top.set_title(f"K={results[names[0]]['workers'] if names else '?'}, H={H}, {steps} steps per worker")
        top.set_xlabel("inner steps per worker")
        top.set_ylabel("held-out loss (nats/byte)")
        top.legend(fontsize=6, ncol=2)
        bottom.axhline(0, color="k", lw=0.8)
        bottom.set_ylim(max(-10.0, min(all_gaps) - 0.5), min(20.0, max(all_gaps) + 0.5))
        bottom.set_xlabel("inner steps per worker")
        bottom.set_ylabel("loss vs DP mean (%)")
        bottom.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def report(args, results: dict, model_cfg: ModelConfig, params: int) -> str:
    lines = [f"model {model_cfg.n_layer}x{model_cfg.n_embd} ({params:,} params), K={args.workers}, batch "
             f"{args.batch_size}x{model_cfg.block_size} per worker, {args.eval_batches} eval batches, device {args.device}"]
    for steps in dict.fromkeys(s for s, _ in args.suites):
        table = suite_table(results, steps, args.workers)
        hs = ", ".join(f"H={H}" for s, H in args.suites if s == steps)
        if table:
            lines += ["", f"### {steps} steps per worker, {hs}", "", *table]
        for H in (H for s, H in args.suites if s == steps):
            grid = grid_table(results, steps, H)
            if grid:
                lines += ["", f"Outer-setting grid, {steps} steps, fp32, H={H}, Δ vs DP mean:", "", *grid]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    model_cfg, data_cfg = configs(args)
    out = Path(args.out)
    old = json.loads(out.read_text()) if args.reuse and out.exists() else {}
    results: dict[str, dict] = dict(old.get("results", {}))
    arms = [a for a in build_arms(args) if a.name not in results]
    params = sum(p.numel() for p in GPT(model_cfg).parameters())
    start = time.perf_counter()

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "torch": torch.__version__,
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "jobs": args.jobs,
               "model": vars(model_cfg), "data": vars(data_cfg), "num_params": params,
               "inner": {f"{s}": vars(inner_config(s)) for s, _ in args.suites}, "results": results}
        out.write_text(json.dumps(doc, indent=1))

    arms.sort(key=lambda a: -a.steps * (1 + (a.kind == "dp")))  # longest first: the jobs end together
    logging.info("%d arms to run (%d reused), %d at a time", len(arms), len(results), args.jobs)
    if args.jobs > 1 and len(arms) > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_arm, args, a): a for a in arms}
            for fut in as_completed(futures):  # saved as each ends: a cut-short run keeps what it finished
                results[futures[fut].name] = fut.result()
                logging.info("done %s: %.4f", futures[fut].name, results[futures[fut].name]["final_eval_loss"])
                save()
    else:
        for a in arms:
            results[a.name] = run_arm(args, a)
            logging.info("done %s: %.4f", a.name, results[a.name]["final_eval_loss"])
            save()
    save()
    text = report(args, results, model_cfg, params)
    out.with_suffix(".md").write_text(text + "\n")
    plotted = write_plot(results, args.suites, out.with_suffix(".png"))
    print(text)
    print(f"\n{len(arms)} arms in {time.perf_counter() - start:.0f} s -> {out}, {out.with_suffix('.md')}"
          + (f", {out.with_suffix('.png')}" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
