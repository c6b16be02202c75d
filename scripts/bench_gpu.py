"""The CUDA path, measured: several peers sharing one GPU against the same swarm on the CPU, side by side.

Runs the local swarm (``swarmloco demo`` machinery: N peer processes on loopback) twice with the same
config, once with ``--device cuda`` (bf16 autocast, pinned-memory staging of the pseudo-gradient)
and once with ``--device cpu``, and reports per device: inner samples/s per peer, round time, held-out
loss, and whether every peer ended every outer step with the same global parameters (sha256).

    python scripts/bench_gpu.py --peers 3 --outer-steps 3 --inner-steps 20 --out runs/bench_gpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from swarmloco.config import DataConfig, InnerConfig, ModelConfig, RunConfig
from swarmloco.app.demo import run_demo
from swarmloco.models.gpt import GPT, num_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--outer-steps", type=int, default=3)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    ap.add_argument("--out", default="runs/bench_gpu.json")
    args = ap.parse_args()

    base = RunConfig(run_id="benchgpu").replace(
        model=ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=4, block_size=args.block_size),
        data=DataConfig(batch_size=args.batch_size, max_bytes=4_000_000, eval_batches=4),
        inner=InnerConfig(steps=args.inner_steps, warmup_steps=5),
    )
    result = {
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "params": num_params(GPT(base.model)), "peers": args.peers, "outer_steps": args.outer_steps,
        "inner_steps": args.inner_steps, "batch": [args.batch_size, args.block_size], "runs": {},
    }
    for device in args.devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"{device}: no CUDA here, skipped")
            continue
        reports: list[dict] = []
        start = time.perf_counter()
        code = run_demo(base.replace(run_id=f"benchgpu-{device}"), peers=args.peers, outer_steps=args.outer_steps,
                        out=io.StringIO(), collect=reports, extra_args=("--device", device))
        wall = time.perf_counter() - start
        ok = [r for r in reports if r.get("ok")]
        by_step: dict[int, set] = defaultdict(set)
        for r in ok:
            by_step[r["outer_step"]].add(r["digest"])
        later = [r for r in ok if r["outer_step"] > 1] or ok  # the first round includes warm-up
        run = {
            "exit_code": code, "wall_s": wall, "rounds_ok": len(ok), "rounds": len(reports),
            "identical_every_step": bool(by_step) and all(len(d) == 1 for d in by_step.values()),
            "samples_per_second_per_peer": statistics.median(r["samples_per_second"] for r in later) if later else None,
            "round_time_s": statistics.median(r["round_time"] for r in later) if later else None,
            "final_eval_loss": statistics.mean(r["eval_loss"] for r in ok if r["outer_step"] == max(by_step))
            if ok else None,
        }
        result["runs"][device] = run
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))  # after each arm: a cut-off run keeps its first
        print(f"{device:5} exit {code} rounds ok {run['rounds_ok']}/{run['rounds']} identical {run['identical_every_step']} "
              f"samples/s/peer {run['samples_per_second_per_peer']} round {run['round_time_s']} "
              f"eval {run['final_eval_loss']} wall {wall:.1f}s")
    runs = result["runs"]
    if "cuda" in runs and "cpu" in runs and runs["cpu"]["samples_per_second_per_peer"]:
        result["cuda_over_cpu_samples_per_second"] = (runs["cuda"]["samples_per_second_per_peer"]
                                                      / runs["cpu"]["samples_per_second_per_peer"])
        print(f"cuda / cpu samples/s per peer: {result['cuda_over_cpu_samples_per_second']:.1f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
