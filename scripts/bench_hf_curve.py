"""A run config's held-out loss curve under DiLoCo (K workers) against data-parallel training on the same tokens.

Builds the config's model and data exactly as a peer would (``[model] kind = "hf"`` builds the transformers
model from its config; ``[data] kind = "hf"`` trains or loads the tokenizer and packs the corpus) and trains
them in the in-process simulator (``swarmloco.sim.simulate``): DiLoCo with the config's inner and outer
settings on K disjoint shards, and synchronous data parallelism over the same K shards (one AdamW on the
K-times batch). Both see the same number of tokens. Prints the curves side by side and writes them as JSON.

    python scripts/bench_hf_curve.py --config configs/llama-tiny.toml --workers 4 --steps 300 --H 30 \\
        --out runs/bench_hf_curve.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from swarmloco.config import load_config
from swarmloco.data import build_corpus, prepare_data
from swarmloco.sim.simulate import run_data_parallel, run_diloco


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/llama-tiny.toml")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300, help="inner steps per worker (DP steps)")
    ap.add_argument("--H", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench_hf_curve.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    data = prepare_data(cfg.data)
    corpus = build_corpus(data, cfg.model.block_size, cfg.seed)
    inner = dataclasses.replace(cfg.inner, steps=args.H, total_steps=args.steps)
    shards = list(range(args.workers))
    started = time.perf_counter()
    dp = run_data_parallel(corpus, cfg.model, inner, workers=args.workers, steps=args.steps, seed=cfg.seed,
                           shards=shards, eval_every=args.eval_every)
    diloco = run_diloco(corpus, cfg.model, inner, cfg.outer, workers=args.workers, steps=args.steps, H=args.H,
                        seed=cfg.seed, shards=shards, eval_every=args.eval_every)
    rows = []
    for a, b in zip(dp["curve"], diloco["curve"]):
        rows.append({"step": a["step"], "dp": a["eval_loss"], "diloco": b["eval_loss"],
                     "gap": b["eval_loss"] / a["eval_loss"] - 1})
        print(f"step {a['step']:5d}  DP {a['eval_loss']:.4f}  DiLoCo {b['eval_loss']:.4f}  "
              f"({100 * rows[-1]['gap']:+.2f}%)", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "config": args.config,
              "workers": args.workers, "steps": args.steps, "H": args.H, "params": dp["num_params"],
              "outer": dataclasses.asdict(cfg.outer), "wall_s": time.perf_counter() - started,
              "final_gap": rows[-1]["gap"] if rows else None, "curve": rows, "dp": dp, "diloco": diloco}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
