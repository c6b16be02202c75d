"""What the public API costs between rounds: inner-step throughput through ``swarmloco.DiLoCo`` vs the same loop
without swarmloco, side by side in one process.

Two identical models (same seed) train on the same batches: one in a plain PyTorch loop, one in the same loop
plus ``diloco.step(samples, loss)`` on a real ``swarmloco.Swarm`` (its DHT, averager, heartbeat and catch-up
threads all running), with ``inner_steps`` larger than the run so that no round interrupts the measurement.
Blocks of ``--block`` steps alternate (plain, API, plain, API, ...); each block's steps/s is recorded and the
ratio API / plain is reported per pair of blocks (median, min, max), in wall time and in the training
thread's own CPU time (``time.thread_time``: what the loop itself spends, steady on a loaded machine), with the
CPU the engine's background threads (heartbeats, catching up) take beside it per inner step.

    python scripts/bench_api.py --blocks 10 --block 20 --out runs/bench_api.json
    python scripts/bench_api.py --config configs/llama-124m.toml --device cuda --batch 16 --peak-tflops 989
                                                 # on a GPU: tokens/s and MFU of the 124M Llama, bf16 autocast
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import swarmloco
from swarmloco.config import ModelConfig, load_config
from swarmloco.models import build_model, lm_loss, num_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=10, help="pairs of (plain, API) blocks")
    ap.add_argument("--block", type=int, default=20, help="inner steps per block")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default="", help="a run config whose [model] to build (default: a byte GPT)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak (bf16) TFLOP/s, for MFU")
    ap.add_argument("--out", default="runs/bench_api.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = load_config(args.config).model if args.config else \
        ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=4, block_size=64)
    plain, wrapped = (build_model(cfg, seed=0).to(device) for _ in range(2))
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, foreach=device.type == "cuda")
    vocab = cfg.config.get("vocab_size", 256) if cfg.kind == "hf" else cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, cfg.block_size + 1), generator=g) for _ in range(args.block)]
    autocast = device.type == "cuda"

    def run(model, opt, diloco=None) -> tuple[float, float, float]:
        """(steps/s of wall time, steps/s of this thread's CPU time, other threads' CPU seconds per step)."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu, proc = time.perf_counter(), time.thread_time(), time.process_time()
        for tokens in batches:
            x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = lm_loss(model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if diloco is not None:
                diloco.step(samples=args.batch, loss=loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, mine = time.perf_counter() - start, time.thread_time() - cpu
        return args.block / wall, args.block / mine, (time.process_time() - proc - mine) / args.block

    with swarmloco.Swarm("bench-api", host_maddrs=["/ip4/127.0.0.1/tcp/0"]) as swarm:
        steps = 2 * args.blocks * args.block + 10
        with swarmloco.DiLoCo(swarm, wrapped, functools.partial(torch.optim.AdamW, lr=1e-3,
                                                                foreach=device.type == "cuda"),
                              inner_steps=steps) as diloco:
            run(plain, plain_opt), run(wrapped, diloco.inner_optimizer, diloco)  # warm up both
            pairs = []
            for _ in range(args.blocks):
                a = run(plain, plain_opt)
                b = run(wrapped, diloco.inner_optimizer, diloco)
                pairs.append((a, b))
            assert diloco.outer_step == 0  # no round interrupted the measurement
    wall = [b[0] / a[0] for a, b in pairs]
    cpu = [b[1] / a[1] for a, b in pairs]
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "device": str(device), "params": num_params(plain), "block_steps": args.block, "blocks": args.blocks,
        "plain_steps_per_s": [a[0] for a, _ in pairs], "api_steps_per_s": [b[0] for _, b in pairs],
        "api_over_plain_median": statistics.median(wall), "api_over_plain_min": min(wall),
        "api_over_plain_max": max(wall),
        "thread_cpu_api_over_plain_median": statistics.median(cpu), "thread_cpu_api_over_plain_min": min(cpu),
        "background_cpu_ms_per_step_api": 1e3 * statistics.median(b[2] for _, b in pairs),
        "background_cpu_ms_per_step_plain": 1e3 * statistics.median(a[2] for a, _ in pairs),
        "plain_step_ms": 1e3 / statistics.median(a[0] for a, _ in pairs),
    }
    tokens = args.batch * cfg.block_size
    for name, index in (("plain", 0), ("api", 1)):
        rate = statistics.median(p[index][0] for p in pairs) * tokens
        result[f"{name}_tokens_per_s"] = rate
        if args.peak_tflops:  # 6 N flops per token (forward + backward), against the device's peak
            result[f"{name}_mfu"] = 6 * num_params(plain) * rate / (args.peak_tflops * 1e12)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_per_s")}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
