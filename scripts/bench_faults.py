"""Fault tolerance in numbers: a peer killed mid-all-reduce, and a late joiner's state download.

Starts N peer processes on loopback (``swarmloco run``), lets them average a few rounds, then makes
one of them hang as a reducer in the middle of an all-reduce (``SWARMLOCO_FAULT=hang_allreduce:K``)
and SIGKILLs its whole process group at that moment. Measures, from the survivors' round reports
and checkpoints:

* stall: the disturbed round's sync time (barrier + averaging) minus the median of normal rounds;
* the fraction of values averaged by the broken attempt, and by the round as finally committed;
* max |theta_i - theta_j| over the survivors' global params after that outer step (checkpoints);

then starts a late joiner and measures its state download against the bytes floor (state bytes at
the raw loopback TCP throughput measured in the same run) and its time to a first contribution.

    python scripts/bench_faults.py --peers 4 --out runs/bench_faults.json
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from peers import PeerProcess  # noqa: E402

from swarmloco.config import config_from_dict, dump_toml  # noqa: E402
from swarmloco.node.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402


def loopback_throughput(nbytes: int = 256 << 20) -> float:
    """Raw TCP bytes/s over 127.0.0.1 (one stream), the floor's reference."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    chunk = b"\0" * (1 << 20)

    def send() -> None:
        conn, _ = server.accept()
        with conn:
            for _ in range(nbytes // len(chunk)):
                conn.sendall(chunk)

    t = threading.Thread(target=send)
    t.start()
    client = socket.create_connection(server.getsockname())
    buf, got, start = bytearray(1 << 20), 0, time.perf_counter()
    while got < nbytes:
        n = client.recv_into(buf)
        if not n:
            break
        got += n
    elapsed = time.perf_counter() - start
    client.close()
    t.join()
    server.close()
    return got / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=4)
    ap.add_argument("--kill-round", type=int, default=4, help="the victim hangs in its K-th all-reduce")
    ap.add_argument("--out", default="runs/bench_faults.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_faults-"))
    base = {
        "run_id": "benchfaults",
        "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": 4, "block_size": 64},
        "data": {"max_bytes": 2_000_000, "batch_size": 4, "eval_batches": 2, "num_shards": 8},
        "inner": {"steps": args.inner_steps, "warmup_steps": 2},
        "swarm": {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "min_peers": args.peers, "heartbeat_period": 0.5,
                  "heartbeat_ttl": 3.0, "matchmaking_time": 2.0, "request_timeout": 1.0, "next_chunk_timeout": 10.0,
                  "allreduce_timeout": 60.0},
    }
    configs = []
    for i in range(args.peers + 1):
        cfg = config_from_dict({**base, "checkpoint": {"dir": str(work / f"ckpt{i}"), "keep": 1000}})
        path = work / f"p{i}.toml"
        path.write_text(dump_toml(cfg))
        configs.append(path)
    params = sum(p.numel() for p in load_params_template(config_from_dict(base)))
    victim_index = args.peers - 1
    peers: list[PeerProcess] = []
    try:
        first = PeerProcess("p0", configs[0], work)
        peers.append(first)
        for i in range(1, args.peers):
            env = {"SWARMLOCO_FAULT": f"hang_allreduce:{args.kill_round}"} if i == victim_index else None
            peers.append(PeerProcess(f"p{i}", configs[i], work, initial_peers=first.maddrs(), env=env))
        victim, survivors = peers[victim_index], [p for p in peers if p is not peers[victim_index]]
        normal = [[p.next_round(300) for p in peers] for _ in range(args.kill_round - 1)]
        victim.wait_event("fault", 300)
        killed_at = time.perf_counter()
        victim.signal_session(signal.SIGKILL)
        disturbed = [p.next_round(300) for p in survivors]
        recovered_s = time.perf_counter() - killed_at
        after = [[p.next_round(300) for p in survivors] for _ in range(2)]

        base_sync = statistics.median(r["sync_s"] for rnd in normal[1:] or normal for r in rnd)
        stall = max(r["sync_s"] for r in disturbed) - base_sync
        broken = [float(m.group(1)) / 100 for r in disturbed for e in r.get("retried", [])
                  for m in [re.search(r"only ([\d.]+)% of values", e or "")] if m]
        step = disturbed[0]["outer_step"]
        states = [load_checkpoint(next(c.path for c in list_checkpoints(work / f"ckpt{peers.index(p)}")
                                       if c.outer_step == step)) for p in survivors]
        max_diff = 0.0
        for other in states[1:]:
            for k, v in states[0]["model"].items():
                max_diff = max(max_diff, float((v.float() - other["model"][k].float()).abs().max()))

        # a late joiner: download time vs bytes floor, and time to its first contribution
        throughput = loopback_throughput()
        t0 = time.perf_counter()
        joiner = PeerProcess("late", configs[args.peers], work, initial_peers=first.maddrs())
        peers.append(joiner)
        downloaded = joiner.wait_event("state_downloaded", 300)
        adopted_s = time.perf_counter() - t0  # process start, DHT bootstrap, state download, checks
        m = re.search(r"\(([\d.]+) MB in ([\d.]+)s\)", downloaded["message"])
        dl_bytes, dl_seconds = float(m.group(1)) * 1e6, float(m.group(2))
        for _ in range(10):
            r = joiner.next_round(300)
            if r["ok"] and r["peers"] > 1 and not r.get("adopted"):
                break
        first_contribution_s = time.perf_counter() - t0
        round_s = statistics.median(r["round_time"] for rnd in after for r in rnd)
        floor_s = dl_bytes / throughput
        result = {
            "date": time.strftime("%Y-%m-%d"), "peers": args.peers, "params": params,
            "state_bytes": dl_bytes, "baseline_sync_s": base_sync,
            "disturbed_sync_s": [r["sync_s"] for r in disturbed], "stall_s": stall,
            "kill_to_commit_s": recovered_s, "attempts": [r["attempts"] for r in disturbed],
            "fraction_averaged_broken_attempt": min(broken) if broken else None,
            "fraction_averaged_committed": 1.0 if all(r["ok"] for r in disturbed) else 0.0,
            "survivor_digests_equal": len({r["digest"] for r in disturbed}) == 1,
            "max_abs_param_diff": max_diff,
            "rounds_after_ok": all(r["ok"] and r["peers"] == args.peers - 1 for rnd in after for r in rnd),
            "loopback_tcp_bytes_per_s": throughput, "download_s": dl_seconds, "bytes_floor_s": floor_s,
            "download_over_floor": dl_seconds / floor_s,
            "download_sources": (re.search(r"from (\d+) peers", downloaded["message"]) or [None, 1])[1],
            "download_bytes_per_s": dl_bytes / dl_seconds, "download_over_round_time": dl_seconds / round_s,
            "spawn_to_state_adopted_s": adopted_s, "round_time_s": round_s,
            "join_to_first_contribution_s": first_contribution_s,
            "first_contribution_over_floor": first_contribution_s / floor_s,
        }
    finally:
        for p in peers:
            p.kill()
    for k, v in result.items():
        print(f"{k:34} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


def load_params_template(cfg) -> list[torch.Tensor]:
    from swarmloco.models.gpt import GPT

    return list(GPT(cfg.model, seed=cfg.seed).parameters())


if __name__ == "__main__":
    main()
