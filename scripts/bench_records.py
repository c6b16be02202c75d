"""What signed records cost a peer: signing its heartbeat, and checking everyone's.

Every ``heartbeat_period`` a peer signs one heartbeat and reads the run's key: one Ed25519
verification (plus msgpack parsing and schema checks) per live peer, and every DHT node of the run
validates what it stores. This times, side by side in one run, the unsigned msgpack heartbeat the peer
used before, the signed record, and the reader path (``read_progress``) and DHT validator on a swarm of
N peers' heartbeats.

    python scripts/bench_records.py --peers 64 --out runs/bench_records.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord

from swarmloco.protocol.identity import Identity
from swarmloco.protocol.progress import PeerProgress, read_progress
from swarmloco.protocol.records import encode_record
from swarmloco.protocol.validators import SignedRecordValidator

KEY = "sl_bench_0123456789abcdef_progress"


def per_second(fn, seconds: float = 1.0) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=64)
    parser.add_argument("--out", default="runs/bench_records.json")
    args = parser.parse_args()

    ids = [Identity.generate() for _ in range(args.peers)]
    now = time.time()
    beats = [PeerProgress(peer_id=i.libp2p_peer_id(), outer_step=7, state="training", time=now, samples=512,
                          samples_per_second=900.0, maddrs=("/ip4/203.0.113.5/tcp/31337",), digest="0123456789abcdef")
             for i in ids]
    raws = [encode_record("progress", b.to_dict(), i, now + 60, key=KEY) for b, i in zip(beats, ids)]
    validator = SignedRecordValidator([KEY])
    key_id = DHTID.generate(source=KEY).to_bytes()
    dht_records = [DHTRecord(key_id, msgpack.packb(i.public_hex), msgpack.packb(raw), now + 60)
                   for i, raw in zip(ids, raws)]

    unsigned = per_second(lambda: msgpack.packb({"v": 1, **beats[0].to_dict()}, use_bin_type=True))
    sign = per_second(lambda: encode_record("progress", beats[0].to_dict(), ids[0], now + 60, key=KEY))
    read_all = per_second(lambda: [read_progress(r, key=KEY, subkey=i.public_hex, now=now) for r, i in zip(raws, ids)])
    validate_all = per_second(lambda: [validator.validate(r) for r in dht_records])
    assert all(read_progress(r, key=KEY, subkey=i.public_hex, now=now)[0] for r, i in zip(raws, ids))
    assert all(validator.validate(r) for r in dht_records)
    result = {
        "peers": args.peers, "machine": platform.processor() or platform.machine(), "record_bytes": len(raws[0]),
        "unsigned_heartbeats_per_s": unsigned, "signed_heartbeats_per_s": sign,
        "swarm_reads_per_s": read_all, "swarm_validations_per_s": validate_all,
        "read_ms_per_heartbeat_period": 1000.0 / read_all,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
