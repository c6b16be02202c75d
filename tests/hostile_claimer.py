"""A hostile process for the lineage tests: it joins the swarm's DHT with a key of its own and publishes
correctly signed heartbeats whose claims are lies. It runs no averager, so it can prove nothing.

    python tests/hostile_claimer.py CONFIG.toml huge    --initial-peers MADDR   # claims outer step 1,000,000
    python tests/hostile_claimer.py CONFIG.toml current --initial-peers MADDR   # the swarm's step, a digest
                                                                                # nobody serves

It prints one ``@@swarmloco {"type": "event", "kind": "claimer", "peer_id": ...}`` line once it publishes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

from swarmloco.config import load_config
from swarmloco.protocol.identity import Identity
from swarmloco.app.peer import run_manifest
from swarmloco.protocol.progress import PeerProgress, ProgressTracker
from swarmloco.protocol.transport import DhtClient


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("mode", choices=["huge", "current"])
    ap.add_argument("--initial-peers", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config)
    manifest = run_manifest(cfg)
    identity = Identity.generate()
    key_path = Path(tempfile.mkdtemp()) / "claimer.key"
    identity.write_libp2p_key(key_path)
    swarm = dataclasses.replace(cfg.swarm, initial_peers=tuple(args.initial_peers))
    client = DhtClient(swarm, identity_path=str(key_path), record_validators=[manifest.validator()])
    tracker = ProgressTracker(client, manifest.progress_key, swarm.heartbeat_ttl, identity)
    digest = secrets.token_hex(8)
    announced = False
    try:
        while True:
            steps = [p.outer_step for p in tracker.fetch() if p.peer_id != client.peer_id]
            step = 1_000_000 if args.mode == "huge" else max(steps, default=0)
            tracker.publish(PeerProgress(peer_id=client.peer_id, outer_step=step, state="training",
                                         time=time.time(), digest=digest, samples=64))
            if not announced:
                print("@@swarmloco " + json.dumps({"type": "event", "kind": "claimer", "peer_id": client.peer_id}),
                      flush=True)
                announced = True
            time.sleep(swarm.heartbeat_period)
    except KeyboardInterrupt:
        pass
    finally:
        client.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
