"""Host<->device copies of a round, pageable against pinned: what the peer's pinned staging buys on CUDA.

Once per outer step a peer copies its local parameters off the GPU (to form the pseudo-gradient on the
CPU) and the new global parameters back onto it. This times both directions for a parameter list shaped
like a transformer's, the way the peer did it before (pageable ``.to("cpu")`` per tensor, pageable
``.to(device)`` per tensor) and the way it does now (page-locked CPU buffers, ``non_blocking`` copies,
one synchronize).

    python scripts/bench_staging.py --params-m 350 --out runs/bench_staging.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def shapes_for(params_m: float, d: int = 1024) -> list[tuple[int, ...]]:
    """Layer-like tensors (4 d x d attention, 2 d x 4d MLP, 2 norms) until about ``params_m`` million."""
    out, total = [], 0
    while total < params_m * 1e6:
        for shape in [(d, d)] * 4 + [(d, 4 * d), (4 * d, d), (d,), (d,)]:
            out.append(shape)
            total += torch.Size(shape).numel()
    return out


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params-m", type=float, default=350)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="runs/bench_staging.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    dev = torch.device("cuda")
    params = [torch.randn(s, device=dev) for s in shapes_for(args.params_m)]
    nbytes = 4 * sum(p.numel() for p in params)
    pinned = [torch.empty(p.shape, pin_memory=True) for p in params]
    pageable = [torch.empty(p.shape) for p in params]

    def d2h_pageable():
        for p in params:
            p.to("cpu", torch.float32)

    def d2h_pinned():
        for st, p in zip(pinned, params):
            st.copy_(p, non_blocking=True)

    def h2d_pageable():
        for p, g in zip(params, pageable):
            p.copy_(g.to(p.device, p.dtype))

    def h2d_pinned():
        for p, g in zip(params, pinned):
            p.copy_(g, non_blocking=True)

    result = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "params": sum(p.numel() for p in params), "bytes": nbytes, "tensors": len(params)}
    for name, fn in [("d2h_pageable", d2h_pageable), ("d2h_pinned", d2h_pinned),
                     ("h2d_pageable", h2d_pageable), ("h2d_pinned", h2d_pinned)]:
        seconds = timed(fn, args.repeats)
        result[name] = {"seconds": seconds, "gb_per_s": nbytes / seconds / 1e9}
        print(f"{name:13} {seconds * 1e3:8.1f} ms  {nbytes / seconds / 1e9:6.1f} GB/s")
    result["d2h_speedup"] = result["d2h_pageable"]["seconds"] / result["d2h_pinned"]["seconds"]
    result["h2d_speedup"] = result["h2d_pageable"]["seconds"] / result["h2d_pinned"]["seconds"]
    print(f"pinned speed-up: device->host {result['d2h_speedup']:.1f}x, host->device {result['h2d_speedup']:.1f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
