"""Bytes per outer step per peer on the wire, per codec, against the all-reduce bound.

Runs a real local swarm (``swarmloco demo`` machinery: N peer processes on loopback) once per
codec and compares the payload bytes each peer sent per round (counted in the all-reduce runner:
codec output, including codec headers and scales, excluding protobuf/libp2p framing) with the
butterfly bound 2(n-1)/n x params x bits/8 (for the sparse top-k codec, which is all-gathered, with
(n-1) x params x bits/8: each peer sends its payload to each other one).

    python scripts/bench_wire.py --peers 4 --codecs none fp16 int8 int4 topk --out runs/bench_wire.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from pathlib import Path

from swarmloco.compression import get_codec
from swarmloco.config import CodecConfig, RunConfig
from swarmloco.app.demo import run_demo
from swarmloco.models.gpt import GPT, num_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--codecs", nargs="+", default=["none", "fp16", "int8", "int4", "topk"])
    ap.add_argument("--outer-steps", type=int, default=2)
    ap.add_argument("--inner-steps", type=int, default=5)
    ap.add_argument("--out", default="runs/bench_wire.json")
    args = ap.parse_args()

    base = RunConfig(run_id="benchwire")
    params = num_params(GPT(base.model))
    n = args.peers
    results = []
    print(f"{'codec':6} {'sent/peer/round':>16} {'bound':>12} {'overhead':>9} {'vs fp32':>8}  rounds")
    for name in args.codecs:
        cfg = base.replace(codec=CodecConfig(name=name), run_id=f"benchwire-{name}")
        codec = get_codec(cfg.codec)
        reports: list[dict] = []
        code = run_demo(cfg, peers=n, outer_steps=args.outer_steps, inner_steps=args.inner_steps,
                        out=io.StringIO(), collect=reports)
        ok = [r for r in reports if r.get("ok") and r.get("peers") == n]
        sent = statistics.median(r["bytes_sent"] for r in ok) if ok else float("nan")
        # butterfly all-reduce: 2(n-1)/n x payload; a sparse codec's all-gather: (n-1) x payload
        share = 2 * (n - 1) / n if codec.info.summable else n - 1
        bound = share * params * codec.info.bits_per_value / 8
        fp32 = 2 * (n - 1) / n * params * 4
        row = {"codec": name, "peers": n, "params": params, "exit_code": code, "rounds_ok": len(ok),
               "bytes_sent_per_peer_per_round": sent, "bound_bytes": bound, "overhead": sent / bound - 1,
               "fp32_ratio": fp32 / sent}
        results.append(row)
        print(f"{name:6} {sent:16,.0f} {bound:12,.0f} {100 * row['overhead']:8.2f}% {row['fp32_ratio']:7.2f}x  {len(ok)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
