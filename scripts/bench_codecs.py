"""Benchmark every codec: single-core encode/decode GB/s and relative error on a real pseudo-gradient.

    python scripts/bench_codecs.py --out runs/bench_codecs.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from swarmloco.compression import codec_names, get_codec
from swarmloco.sim.measure import measure_codec, real_pseudo_gradient, tile_to
from swarmloco.config import CodecConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_codecs.json")
    ap.add_argument("--steps", type=int, default=30, help="AdamW steps that produce the pseudo-gradient")
    ap.add_argument("--large", type=int, default=16 * 1024 * 1024, help="values in the tiled large tensor")
    ap.add_argument("--repeats", type=int, default=9, help="timed runs per figure; the best is kept")
    ap.add_argument("--cache", default="runs/pseudo_grad.pt", help="reuse/save the pseudo-gradient here ('' = never)")
    ap.add_argument("--block-size", type=int, default=CodecConfig.block_size)
    ap.add_argument("--topk-fraction", type=float, default=CodecConfig.topk_fraction)
    args = ap.parse_args()

    torch.manual_seed(0)
    start = time.perf_counter()
    cache = Path(args.cache) if args.cache else None
    cached = torch.load(cache) if cache and cache.exists() else None
    if cached is not None and cached["steps"] == args.steps:
        pseudo = cached["pseudo_grad"]
    else:
        pseudo = real_pseudo_gradient(steps=args.steps)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"steps": args.steps, "pseudo_grad": pseudo}, cache)
    print(f"pseudo-gradient: {pseudo.numel():,} values from {args.steps} AdamW steps "
          f"({time.perf_counter() - start:.0f} s), rms {float(pseudo.square().mean().sqrt()):.3g}")
    torch.set_num_threads(1)
    tensors = {"pseudo_grad": pseudo, "tiled_16M": tile_to(pseudo, args.large)}
    results = []
    for name in codec_names():
        codec = get_codec(CodecConfig(name=name, block_size=args.block_size, topk_fraction=args.topk_fraction))
        for label, tensor in tensors.items():
            results.append(measure_codec(codec, tensor, label, repeats=args.repeats).as_dict())

    header = "| codec | tensor | values | ratio | encode GB/s | decode GB/s | enc+dec GB/s | rel. L2 error |"
    print(header + "\n|" + "---|" * 8)
    for r in results:
        print(f"| {r['codec']} | {r['tensor']} | {r['numel']:,} | {r['ratio']:.4f} | {r['encode_gbps']:.2f} | "
              f"{r['decode_gbps']:.2f} | {r['roundtrip_gbps']:.2f} | {r['rel_error']:.2e} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": 1,
        "steps": args.steps, "block_size": args.block_size, "topk_fraction": args.topk_fraction,
        "results": results,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
