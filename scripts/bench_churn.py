"""Churn soak: a swarm of tiny-model peers on one machine under random faults, for minutes.

Starts N peer processes on loopback (``swarmloco run``), then every few seconds injects one fault at
random: SIGKILL of a peer's whole process group (restarted a little later, half the time with
``--resume``), SIGSTOP then SIGCONT, SIGTERM and a restart with or without ``--resume``, a brand-new
joiner, or a hostile claimer (``tests/hostile_claimer.py``: signed heartbeats claiming outer step
1,000,000 or the current step with a digest nobody serves). Every peer's round reports are collected.

Reported (``--out`` JSON, summary on stdout):

* rounds committed (swarm outer steps reached, and commits by all peers), bytes sent and received;
* the stall of each fault: the longest gap between two advances of the swarm's outer step in the 30 s
  after it, minus the median gap of the run;
* distinct lineages alive over time, sampled every second: live peers' latest (step, digest) tips that
  are not a point of another live peer's reported history (after each fault it must fall back to 1);
* every peer's final digest at the last step all of them reached, once the churn stopped (all equal).

    python scripts/bench_churn.py --peers 12 --minutes 10 --out runs/bench_churn.json
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from peers import PeerProcess  # noqa: E402

from swarmloco.config import config_from_dict, dump_toml  # noqa: E402

FAULTS = ("sigkill", "sigstop", "restart", "joiner", "claimer")


class Swarm:
    """The peers, their round reports, and what each one's chain looks like from outside."""

    def __init__(self, work: Path, base: dict, env: dict):
        self.work, self.base, self.env = work, base, env
        self.live: dict[str, PeerProcess] = {}
        self.stopping: dict[str, tuple[PeerProcess, float]] = {}  # name -> (peer, kill after): SIGTERMed
        self.frozen: set[str] = set()
        self.history: dict[str, dict[int, str]] = {}  # name -> {outer step: digest} of its current chain
        self.rounds: list[dict] = []
        self.count = 0
        self.first: PeerProcess | None = None

    def config(self, name: str) -> Path:
        path = self.work / f"{name}.toml"
        if not path.exists():
            cfg = config_from_dict({**self.base, "checkpoint": {"dir": str(self.work / f"ckpt-{name}"), "keep": 2}})
            path.write_text(dump_toml(cfg))
        return path

    def start(self, name: str | None = None, resume: bool = False) -> str:
        if name is None:
            name, self.count = f"p{self.count}", self.count + 1
        seeds = [m for p in list(self.live.values())[:2] for m in p.maddrs()]
        peer = PeerProcess(name, self.config(name), self.work, *(["--resume"] if resume else []),
                           initial_peers=seeds, env=self.env)
        self.live[name] = peer
        self.history[name] = {}
        self.first = self.first or peer
        return name

    def stop(self, name: str, sig: int, wait: bool = True) -> None:
        """Signal a peer; SIGTERM: it stops cleanly, waited for here or (``wait=False``) in :meth:`reap`."""
        peer = self.live.pop(name)
        self.frozen.discard(name)
        peer.signal_session(sig) if sig == signal.SIGKILL else peer.signal(sig)
        self.stopping[name] = (peer, time.time() + 60.0)
        if wait or sig == signal.SIGKILL:
            try:
                peer.wait(60)
            except subprocess.TimeoutExpired:
                pass
            self.reap(force=name)

    def reap(self, force: str | None = None) -> None:
        """Finish the stops of peers that exited (or, past their deadline or when forced, kill them)."""
        for name, (peer, deadline) in list(self.stopping.items()):
            if peer.proc.poll() is None and name != force and time.time() < deadline:
                continue
            if peer.proc.poll() is None:
                peer.signal_session(signal.SIGKILL)
            peer.kill()
            del self.stopping[name]

    def drain(self) -> None:
        for name, peer in list(self.live.items()):
            while True:
                try:
                    ev = peer.events.get_nowait()
                except Exception:  # noqa: BLE001 - queue.Empty
                    break
                if ev.get("type") != "round":
                    continue
                ev["name"], ev["t"] = name, time.time()
                self.rounds.append(ev)
                if ev.get("adopted"):
                    self.history[name] = {}
                if ev.get("ok"):
                    self.history[name][ev["outer_step"]] = ev["digest"]

    def lineages(self) -> int:
        tips = {}
        for name in self.live:
            if name in self.frozen or not self.history.get(name):
                continue
            step = max(self.history[name])
            tips[name] = (step, self.history[name][step])
        distinct = set()
        for name, (step, digest) in tips.items():
            contained = any(other != name and self.history[other].get(step) == digest and
                            max(self.history[other]) > step for other in tips)
            if not contained:
                distinct.add((step, digest))
        return len(distinct)


def common_step(swarm: Swarm, histories: dict[str, dict[int, str]] | None = None) -> int | None:
    """The last outer step every live peer's current chain holds (None while one holds none of them)."""
    histories = histories if histories is not None else {n: swarm.history[n] for n in swarm.live}
    if not histories:
        return None
    return max(set.intersection(*(set(h) for h in histories.values())), default=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=12)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--every", type=float, nargs=2, default=(10.0, 25.0), help="seconds between faults (min max)")
    ap.add_argument("--settle", type=float, default=45.0, help="seconds without faults at the end")
    ap.add_argument("--final-wait", type=float, default=120.0,
                    help="at most this many seconds more for every live peer to reach a common outer step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_churn.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench_churn-"))
    base = {
        "run_id": "churn",
        "model": {"n_layer": 1, "n_embd": 64, "n_head": 2, "block_size": 32},
        "data": {"max_bytes": 1_000_000, "batch_size": 8, "eval_batches": 2, "num_shards": 16},
        "inner": {"steps": 8, "warmup_steps": 4, "lr": 3e-3},
        "swarm": {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "matchmaking_time": 2.0, "request_timeout": 1.0,
                  "ready_timeout": 20.0, "allreduce_timeout": 30.0, "next_chunk_timeout": 5.0,
                  "heartbeat_period": 1.0, "heartbeat_ttl": 6.0, "min_peers": 1},
    }
    swarm = Swarm(work, base, env={"SWARMLOCO_FAULT": "slow_steps:0.05", "OMP_NUM_THREADS": "1"})
    faults: list[dict] = []
    samples: list[tuple[float, int]] = []
    claimers: list[tuple[subprocess.Popen, float]] = []
    pending: list[tuple[float, str, bool]] = []  # (when, name, resume): restarts to do
    thawing: list[tuple[float, str]] = []
    start = time.time()
    try:
        for _ in range(args.peers):
            swarm.start()
        end_churn = start + 60 * args.minutes
        next_fault = start + 20.0
        while time.time() < end_churn + args.settle:
            now = time.time()
            swarm.drain()
            if not samples or now - start - samples[-1][0] >= 1.0:
                samples.append((now - start, swarm.lineages()))
            swarm.reap()
            for when, name, resume in [p for p in pending if p[0] <= now and p[1] not in swarm.stopping]:
                pending.remove((when, name, resume))
                swarm.start(name, resume=resume)
            for when, name in [t for t in thawing if t[0] <= now]:
                thawing.remove((when, name))
                if name in swarm.live:
                    swarm.live[name].signal_session(signal.SIGCONT)
                    swarm.frozen.discard(name)
            for proc, until in [c for c in claimers if c[1] <= now]:
                claimers.remove((proc, until))
                proc.kill()
                proc.wait(10)
            if now < end_churn and now >= next_fault and len(swarm.live) > 3:
                kind = rng.choice(FAULTS)
                victims = [n for n in swarm.live if n not in swarm.frozen and swarm.live[n] is not swarm.first]
                name = rng.choice(victims) if victims else None
                if kind == "sigkill" and name:
                    swarm.stop(name, signal.SIGKILL)
                    pending.append((now + rng.uniform(5, 15), name, rng.random() < 0.5))
                elif kind == "sigstop" and name:
                    swarm.live[name].signal_session(signal.SIGSTOP)
                    swarm.frozen.add(name)
                    thawing.append((now + rng.uniform(5, 15), name))
                elif kind == "restart" and name:
                    swarm.stop(name, signal.SIGTERM, wait=False)  # (restarted 1 s after it exited)
                    pending.append((now + 1.0, name, rng.random() < 0.5))
                elif kind == "joiner":
                    name = swarm.start()
                elif kind == "claimer":
                    mode = rng.choice(["huge", "current"])
                    cmd = [sys.executable, str(ROOT / "tests" / "hostile_claimer.py"), str(swarm.config("claimer")),
                           mode, "--initial-peers", swarm.first.maddrs()[0]]
                    claimers.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                      start_new_session=True), now + 20.0))
                    name = mode
                faults.append({"t": now - start, "kind": kind, "peer": name})
                print(f"[{now - start:6.1f}s] {kind} {name} (peers live {len(swarm.live)})", flush=True)
                next_fault = now + rng.uniform(*args.every)
            time.sleep(0.25)  # the sampling period of this harness, not a synchronization
        # the churn is over: wait (bounded) until every live peer committed an outer step all of them hold
        settled_by = time.time() + args.final_wait
        while time.time() < settled_by and not common_step(swarm):
            swarm.drain()
            time.sleep(0.25)
        swarm.drain()
    finally:
        for proc, _ in claimers:
            proc.kill()
        for name in list(swarm.live):
            swarm.live[name].signal_session(signal.SIGCONT)
        finals = {name: dict(swarm.history[name]) for name in swarm.live}
        for name in list(swarm.live):  # all at once, then wait for them together (bounded: 60 s each at most)
            swarm.stop(name, signal.SIGTERM, wait=False)
        while swarm.stopping:
            swarm.reap()
            time.sleep(0.25)

    commits = [r for r in swarm.rounds if r["ok"] and not r.get("adopted")]
    advance: list[tuple[float, int]] = []
    for r in sorted(commits, key=lambda r: r["t"]):
        if not advance or r["outer_step"] > advance[-1][1]:
            advance.append((r["t"] - start, r["outer_step"]))
    gaps = [b[0] - a[0] for a, b in zip(advance, advance[1:])]
    median_gap = statistics.median(gaps) if gaps else float("nan")
    for f, nxt in zip(faults, faults[1:] + [{"t": float("inf")}]):
        until = min(f["t"] + 30, nxt["t"])  # gaps after the next fault are that one's
        window = [b[0] - a[0] for a, b in zip(advance, advance[1:]) if f["t"] <= b[0] <= until]
        f["stall_s"] = max(0.0, max(window, default=median_gap) - median_gap)
        after = [n for t, n in samples if f["t"] <= t <= f["t"] + 60]
        settled = next((t for t, n in samples if t >= f["t"] and n <= 1), None)
        f["max_lineages_after"], f["back_to_one_after_s"] = max(after, default=0), \
            (settled - f["t"]) if settled is not None else None
    common = common_step(swarm, finals)  # the last outer step every live peer reported
    final_digests = {name: h.get(common) for name, h in finals.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"), "peers": args.peers, "minutes": args.minutes, "seed": args.seed,
        "swarm_outer_steps": advance[-1][1] if advance else 0, "commits_all_peers": len(commits),
        "median_round_gap_s": median_gap, "faults": faults,
        "stall_s": {k: [f["stall_s"] for f in faults if f["kind"] == k] for k in FAULTS},
        "max_lineages": max((n for _, n in samples), default=0),
        "lineages_over_time": samples[::5],
        "bytes_sent": sum(r.get("bytes_sent", 0) for r in swarm.rounds),
        "bytes_received": sum(r.get("bytes_received", 0) for r in swarm.rounds),
        "final_tips": {name: max(h, default=None) for name, h in finals.items()},
        "rounds_per_peer": {name: sum(1 for r in swarm.rounds if r["name"] == name) for name in finals},
        "final_step": common, "final_digests_equal": common is not None and len(set(final_digests.values())) == 1,
        "final_digests": final_digests,
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("lineages_over_time", "faults")}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
