"""Quality benchmark: DiLoCo vs synchronous data parallelism at equal training tokens.

Arms (all on the same corpus, same inner AdamW hyperparameters, cosine schedule over the run):

* ``dp-k{K}-s{seed}``  -- synchronous data parallel, K workers (one AdamW on a K-times batch), per seed;
* ``diloco-k{K}-H{H}-olr{lr}`` -- DiLoCo, K simulated workers, outer Nesterov(lr, momentum 0.9);
* ``diloco-k{K}-H{H}-olr{lr}-{codec}`` -- the same with each pseudo-gradient sent through a codec
  (``--codecs``; error feedback per worker for lossy codecs; 'none' is the plain fp32 arm above);
* ``single-s{seed}``   -- one worker, same steps as DP: K times fewer tokens (a reference only).

Each worker of an arm trains on its own shard; DP and DiLoCo see the same batches. The held-out loss
of each arm's final (global) model is reported, with DiLoCo relative to DP, and the bytes each worker
sends (ring all-reduce of fp32 values: DP every step, DiLoCo every H steps).

    python scripts/bench_quality.py                 # full run (~13 min on one x86 CPU core)
    python scripts/bench_quality.py --quick         # smoke run, < 60 s
    python scripts/bench_quality.py --H 100 --outer-lr 0.7 0.5 --reuse   # add arms to an existing JSON
    python scripts/bench_quality.py --H 100 --codecs int8 int4 --reuse --no-single   # codec arms
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from swarmloco.compression.registry import codec_names, get_codec
from swarmloco.config import CodecConfig, DataConfig, InnerConfig, ModelConfig, OuterConfig
from swarmloco.data.text import Corpus
from swarmloco.node.simulate import codec_transform, ring_equivalent_bytes_per_value, run_data_parallel, run_diloco


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="inner steps per worker (DP steps)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--H", type=int, nargs="+", default=[25, 100], help="DiLoCo inner steps per round")
    ap.add_argument("--outer-lr", type=float, nargs="+", default=[0.7], help="DiLoCo outer lr(s)")
    ap.add_argument("--codecs", nargs="+", default=["none"], choices=codec_names(),
                    help="pseudo-gradient codec(s) for the DiLoCo arms ('none' = fp32, no suffix)")
    ap.add_argument("--no-error-feedback", action="store_true", help="lossy codecs without error feedback")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                    help="DP seeds (init + data stream); DiLoCo and single use the first")
    ap.add_argument("--eval-batches", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--n-layer", type=int, default=ModelConfig.n_layer)
    ap.add_argument("--n-embd", type=int, default=ModelConfig.n_embd)
    ap.add_argument("--no-single", action="store_true", help="skip the single-worker reference")
    ap.add_argument("--reuse", action="store_true", help="keep arms already in --out, run only missing ones")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (< 60 s)")
    ap.add_argument("--out", default="runs/bench_quality.json")
    return ap.parse_args(argv)


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n else "0"


def table(results: dict[str, dict], dp_names: list[str]) -> str:
    dp_ref = statistics.mean(results[n]["final_eval_loss"] for n in dp_names)
    dp0 = results[dp_names[0]]["final_eval_loss"]
    dp_bytes = results[dp_names[0]]["bytes_sent_per_worker"]
    rows = ["| arm | workers | tokens (M) | syncs | held-out loss | / DP mean | Δ vs DP mean | Δ vs DP seed "
            f"{results[dp_names[0]]['seed']} | bytes sent / worker | DP bytes / arm bytes | wall (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        loss = r["final_eval_loss"]
        ratio = f"{dp_bytes / r['bytes_sent_per_worker']:.0f}x" if r["bytes_sent_per_worker"] else "-"
        rows.append(f"| {name} | {r['workers']} | {r['tokens'] / 1e6:.2f} | {r['syncs']} | {loss:.4f} | "
                    f"{loss / dp_ref:.4f} | {100 * (loss / dp_ref - 1):+.2f}% | {100 * (loss / dp0 - 1):+.2f}% | "
                    f"{fmt_bytes(r['bytes_sent_per_worker'])} | {ratio} | {r['wall_s']:.0f} |")
    losses = [results[n]["final_eval_loss"] for n in dp_names]
    if len(losses) > 1:
        spread = max(losses) - min(losses)
        rows.append(f"\nDP seed spread: {spread:.4f} ({100 * spread / dp_ref:.2f}% of the DP mean) over "
                    f"seeds {[results[n]['seed'] for n in dp_names]}")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    k = args.workers
    if args.quick:
        args.steps, args.H, args.eval_batches, args.eval_every = 40, [10, 20], 4, 20
        model_cfg = ModelConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)
        data_cfg = DataConfig(max_bytes=1_000_000, num_shards=k, batch_size=8, eval_batches=4)
        if args.out == "runs/bench_quality.json":
            args.out = "runs/bench_quality_quick.json"
    else:
        model_cfg = ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd)
        data_cfg = DataConfig(num_shards=k, eval_batches=args.eval_batches)
    inner_cfg = InnerConfig(lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
                            warmup_steps=min(50, args.steps // 10), total_steps=args.steps)
    corpus = Corpus(data_cfg, model_cfg.block_size, seed=0)
    out = Path(args.out)
    old = json.loads(out.read_text()) if args.reuse and out.exists() else {}
    results: dict[str, dict] = dict(old.get("results", {}))
    common = dict(steps=args.steps, eval_every=args.eval_every)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": 1,
            "model": vars(model_cfg), "data": vars(data_cfg), "inner": vars(inner_cfg),
            "corpus_bytes": corpus.tokens.numel(), "results": results,
        }
        out.write_text(json.dumps(doc, indent=1))

    def arm(name: str, fn, *a, **kw) -> None:
        if name in results:
            logging.info("reusing %s", name)
            return
        logging.info("running %s", name)
        results[name] = fn(*a, **kw)
        save()

    dp_names = []
    for seed in args.seeds:
        dp_names.append(f"dp-k{k}-s{seed}")
        arm(dp_names[-1], run_data_parallel, corpus, model_cfg, inner_cfg, workers=k, seed=seed, **common)
    for H in args.H:
        for olr in args.outer_lr:
            for name in args.codecs:
                codec = get_codec(CodecConfig(name=name))
                suffix = "" if name == "none" else f"-{name}" + ("-noef" if args.no_error_feedback else "")
                arm_name = f"diloco-k{k}-H{H}-olr{olr:g}{suffix}"
                arm(arm_name, run_diloco, corpus, model_cfg, inner_cfg,
                    OuterConfig(lr=olr, momentum=0.9), workers=k, H=H, seed=args.seeds[0],
                    transform=None if name == "none" else codec_transform(codec, k, not args.no_error_feedback),
                    bytes_per_value=ring_equivalent_bytes_per_value(codec, k), **common)
                results[arm_name].setdefault("codec", name)
    if not args.no_single:
        arm(f"single-s{args.seeds[0]}", run_data_parallel, corpus, model_cfg, inner_cfg, workers=1,
            seed=args.seeds[0], **common)
    save()
    print(f"model {model_cfg.n_layer}x{model_cfg.n_embd} ({results[dp_names[0]]['num_params']:,} params), "
          f"{args.steps} steps, batch {data_cfg.batch_size}x{model_cfg.block_size} per worker, "
          f"{args.eval_batches} eval batches -> {out}")
    print(table(results, dp_names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
