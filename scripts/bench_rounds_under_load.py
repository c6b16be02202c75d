"""Rounds lost to the transport: N peers in sub-second rounds on a machine kept busy by CPU hogs.

Every round of every peer is classified: committed with the whole swarm on the first attempt, re-run,
committed by a smaller group, or adopted (this peer failed the round and downloaded the others' state).
The peers' logs are searched for the fingerprints of the two transport races fixed on 2026-12-01: a
stream that ended short ("sent k parts, expected n") and a member that was not in its group.

    python scripts/bench_rounds_under_load.py --peers 4 --rounds 40 --hogs 2 --out runs/bench_rounds.json

Run it with ``PYTHONPATH=<a checkout>`` to measure another version of the code side by side.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import tiny_config  # noqa: E402
from peers import PeerProcess  # noqa: E402

from swarmloco.config import dump_toml  # noqa: E402

FINGERPRINTS = {  # one log line per event
    "torn_stream": re.compile(r"WARN swarmloco\.protocol\.errors: reducer .* sent \d+ parts, expected \d+"),
    "not_in_group": re.compile(r"WARN swarmloco\.protocol\.errors: reducer .* is not in this group"
                               r"|WARN swarmloco\.node\.round: round for .* could not find a group"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--hogs", type=int, default=2, help="busy processes beside the peers")
    ap.add_argument("--codec", default="none")
    ap.add_argument("--out", default="runs/bench_rounds.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_rounds-"))
    cfg = work / "run.toml"
    cfg.write_text(dump_toml(tiny_config(swarm={"heartbeat_period": 0.5, "heartbeat_ttl": 3.0,
                                                "min_peers": args.peers}, codec={"name": args.codec})))
    env = {"SWARMLOCO_FAULT": "slow_steps:0.05"}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    peers = [PeerProcess("p0", cfg, work, env=env)]
    started = time.monotonic()
    try:
        peers += [PeerProcess(f"p{i}", cfg, work, initial_peers=peers[0].maddrs(), env=env)
                  for i in range(1, args.peers)]
        for _ in range(args.rounds):
            for p in peers:
                p.next_round(180)
    finally:
        for h in hogs:
            h.kill()
        for p in peers:
            p.kill()
    rounds = [r for p in peers for r in p.rounds]
    full = [r for r in rounds if r["ok"] and not r["adopted"] and r["peers"] == args.peers]
    result = {
        "date": time.strftime("%Y-%m-%d"), "peers": args.peers, "rounds_per_peer": args.rounds, "hogs": args.hogs,
        "codec": args.codec, "seconds": round(time.monotonic() - started, 1),
        "rounds": len(rounds),
        "whole_swarm_first_attempt": sum(1 for r in full if r["attempts"] == 1),
        "re_run": sum(1 for r in rounds if r["attempts"] > 1),
        "smaller_group": sum(1 for r in rounds if r["ok"] and not r["adopted"] and r["peers"] < args.peers),
        "adopted": sum(1 for r in rounds if r["adopted"]),
        "failed": sum(1 for r in rounds if not r["ok"]),
        **{name: sum(len(rx.findall(p.log_path.read_text())) for p in peers) for name, rx in FINGERPRINTS.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
