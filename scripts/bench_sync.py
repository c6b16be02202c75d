"""The blocking sync call of swarmloco's DiLoCo vs torchft's DiLoCo, side by side on one workload.

Two peers (two OS processes) on 127.0.0.1 train the same byte GPT (``--n-layer 12 --n-embd 256``: ~9.5M
params, built from seed 0 on both) with AdamW (lr 1e-3) on random byte batches (8 x 64) from a per-peer seed,
and sync every ``--inner-steps`` steps: fp32 pseudo-gradients, outer SGD Nesterov (lr 0.7, momentum 0.9),
one torch thread per process. The two systems run one after the other, ``--rounds`` rounds each (the first
dropped as warm-up); each round's figures of both peers are pooled into median / min / max.

* swarmloco: ``swarmloco.Swarm`` + ``swarmloco.DiLoCo`` as in examples/own_model.py (``min_peers=2``).
  Measured: the wall time of the ``diloco.step()`` call that runs the round, and the round's parts
  (barrier_s, matchmaking_s, allreduce_s, outer_step_s, sync_s) from ``report.details``, or, for a part
  the report lacks, from the status board's ``last_round`` (``diloco.board``); after_barrier_s is the call
  minus barrier_s (the barrier mostly waits for the other peer to finish its inner steps).
* torchft: ``torchft.local_sgd.DiLoCo`` over a ``torchft.Manager`` (``ProcessGroupGloo``, one replica group
  of one process per peer, ``min_replica_size=2``, ``init_sync=False``: both start from the same weights),
  the lighthouse (``torchft.coordination.LighthouseServer``, ``min_replicas=2``) inside peer 0's process.
  torchft syncs in the inner optimizer's step post-hook, so the sync call is the ``optimizer.step()`` that
  ends the round minus the median of that round's other ``optimizer.step()`` calls; its parts are timed by
  wrapping the manager's / fragment's methods: quorum (``start_quorum``, synchronous), prepare
  (pseudo-gradients + launching the per-tensor all-reduces), allreduce_wait (``perform_sync`` until the
  all-reduces are done), restore (back to the global parameters), should_commit, outer_step (the rest:
  outer SGD step, saving the parameters); after_quorum_s is the call minus quorum_s (the quorum, like
  swarmloco's barrier, mostly waits for the other peer), the fair figure to set beside after_barrier_s.

Both arms check that the replicas hold identical global parameters at the same outer step.
torchft is not a dependency of swarmloco; install it only to run its arm (0.2.0 also needs opentelemetry,
so a second venv that sees this one's packages keeps the project's venv clean), e.g.::

    python -m venv /tmp/tft && echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > /tmp/tft/lib/python3.11/site-packages/main_venv.pth && /tmp/tft/bin/pip install torchft==0.2.0
    python scripts/bench_sync.py --rounds 6 --inner-steps 20 --torchft-python /tmp/tft/bin/python
    python scripts/bench_sync.py --only swarmloco --rounds 4 --n-layer 4 --out runs/bench_sync_small.json
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

from swarmloco.config import ModelConfig
from swarmloco.models import build_model, lm_loss, num_params

SWARMLOCO_PARTS = ("step_call_s", "after_barrier_s", "barrier_s", "matchmaking_s", "allreduce_s", "outer_step_s",
                   "sync_s")
TORCHFT_PARTS = ("sync_call_s", "after_quorum_s", "quorum_s", "prepare_s", "allreduce_wait_s", "restore_s",
                 "should_commit_s", "outer_step_s")
INSTALL_TORCHFT = "pip install torchft==0.2.0 (with its opentelemetry deps), or --torchft-python a venv that has it"


def build(a) -> torch.nn.Module:
    return build_model(ModelConfig(n_layer=a.n_layer, n_embd=a.n_embd, n_head=4, block_size=64), seed=0)


def batches(rank: int):
    g = torch.Generator().manual_seed(1000 + rank)  # this peer's own data
    while True:
        tokens = torch.randint(0, 256, (8, 65), generator=g)
        yield tokens[:, :-1], tokens[:, 1:]


def publish(path: Path, text: str) -> None:
    path.with_suffix(".tmp").write_text(text)
    os.replace(path.with_suffix(".tmp"), path)


def wait_file(path: Path, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no {path.name} after {timeout:.0f}s: the other peer did not start")
        time.sleep(0.1)
    return path.read_text()


def params_sha(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def swarmloco_worker(a, rank: int, tmp: Path) -> dict:
    import swarmloco
    model = build(a)
    peers = [] if rank == 0 else [wait_file(tmp / "maddr")]
    rounds, steps = [], []
    with swarmloco.Swarm("bench-sync", initial_peers=peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                         min_peers=2) as swarm:
        if rank == 0:
            publish(tmp / "maddr", str(swarm.visible_maddrs()[0]))
        with swarmloco.DiLoCo(swarm, model, functools.partial(torch.optim.AdamW, lr=1e-3),
                              inner_steps=a.inner_steps, outer=swarmloco.OuterConfig(lr=0.7, momentum=0.9)) as diloco:
            opt = diloco.inner_optimizer
            for x, y in batches(rank):
                t0 = time.perf_counter()
                loss = lm_loss(model, x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                t1 = time.perf_counter()
                report = diloco.step(samples=len(x), loss=loss)
                t2 = time.perf_counter()
                steps.append(t1 - t0)
                if report is None:
                    continue
                last = diloco.board.get("last_round") or {}
                parts = {k: report.details.get(k, last.get(k)) for k in SWARMLOCO_PARTS[2:]}
                rounds.append({"outer_step": report.outer_step, "ok": report.ok, "adopted": report.adopted,
                               "peers": report.peers, "step_call_s": t2 - t1, **parts,
                               "after_barrier_s": t2 - t1 - (parts["barrier_s"] or 0.0), "digest": diloco.digest[:16],
                               "in_details": sorted(k for k in parts if k in report.details)})
                print(f"peer {rank} round {report.outer_step} ok={report.ok} peers={report.peers} "
                      f"step() {t2 - t1:.3f}s {parts}", flush=True)
                if len(rounds) >= a.rounds:
                    break
            result = {"rounds": rounds, "outer_step": diloco.outer_step, "digest": diloco.digest,
                      "inner_step_s": statistics.median(steps)}
            if rank == 0:  # stay in the swarm until the other peer is done too
                publish(tmp / "swarmloco0.json", json.dumps(result))
                wait_file(tmp / "swarmloco1.json", timeout=120)
    return result


def torchft_worker(a, rank: int, tmp: Path) -> dict:
    try:
        import torchft
        from torchft.coordination import LighthouseServer
        from torchft.local_sgd import DiLoCo
    except ImportError as e:
        raise SystemExit(f"torchft arm: {e!r}; install: {INSTALL_TORCHFT}") from None
    from torch.distributed import TCPStore
    lighthouse = None
    if rank == 0:
        lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=2)
        publish(tmp / "lighthouse", "http://127.0.0.1:" + lighthouse.address().rsplit(":", 1)[1])
    addr = wait_file(tmp / "lighthouse")
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # this replica group's store
    model = build(a)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    limit = timedelta(seconds=120)
    manager = torchft.Manager(pg=torchft.ProcessGroupGloo(timeout=limit), load_state_dict=None, state_dict=None,
                              min_replica_size=2, use_async_quorum=False, init_sync=False, replica_id=f"bench_{rank}",
                              lighthouse_addr=addr, store_addr="127.0.0.1", store_port=store.port, rank=0,
                              world_size=1, hostname="127.0.0.1", timeout=limit, quorum_timeout=limit,
                              connect_timeout=limit)
    marks: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            marks[name] = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                marks[name + "_end"] = time.perf_counter()
        return wrapper

    rounds, steps, data = [], [], batches(rank)
    with DiLoCo(manager, [model], inner, outer, sync_every=a.inner_steps) as diloco:
        frag = diloco._fragments[0]
        manager.start_quorum = timed("quorum", manager.start_quorum)
        manager.should_commit = timed("commit", manager.should_commit)
        frag.prepare_sync = timed("prepare", frag.prepare_sync)
        frag.perform_sync = timed("perform", frag.perform_sync)
        frag._save_local_parameters = timed("waited", frag._save_local_parameters)  # first thing after the waits
        while len(rounds) < a.rounds:
            opt_s = []
            for _ in range(a.inner_steps):  # the H-th optimizer.step() runs the sync in its post-hook
                x, y = next(data)
                t0 = time.perf_counter()
                loss = lm_loss(model, x, y)
                loss.backward()
                t1 = time.perf_counter()
                inner.step()
                opt_s.append(time.perf_counter() - t1)
                inner.zero_grad(set_to_none=True)
                steps.append(time.perf_counter() - t0)
            m = marks
            r = {"outer_step": manager.current_step(), "opt_step_s": opt_s[-1],
                 "sync_call_s": opt_s[-1] - statistics.median(opt_s[:-1]), "quorum_s": m["quorum_end"] - m["quorum"],
                 "prepare_s": m["prepare_end"] - m["prepare"], "allreduce_wait_s": m["waited"] - m["perform"],
                 "restore_s": m["commit"] - m["waited"],
                 "should_commit_s": m["commit_end"] - m["commit"], "outer_step_s": m["perform_end"] - m["commit_end"]}
            r["after_quorum_s"] = r["sync_call_s"] - r["quorum_s"]
            rounds.append(r)
            print(f"peer {rank} round {len(rounds)}: {r}", flush=True)
    result = {"rounds": rounds, "outer_step": manager.current_step(), "digest": params_sha(model),
              "inner_step_s": statistics.median(steps), "version": getattr(torchft, "__version__", "0.2.0?")}
    if rank == 0:  # keep the lighthouse and this group's manager up until the other replica is done
        publish(tmp / "torchft0.json", json.dumps(result))
        wait_file(tmp / "torchft1.json", timeout=120)
    manager.shutdown(wait=False)
    if lighthouse is not None:
        lighthouse.shutdown()
    return result


def reap(proc: subprocess.Popen) -> None:
    """End a worker and whatever it started (its own session: the p2pd daemons, hivemind's averager)."""
    if proc.poll() is None:
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # orphans left in the worker's session, if any
    except (ProcessLookupError, PermissionError):
        pass


def run_system(a, system: str, tmp: Path) -> list[dict]:
    python = a.torchft_python if system == "torchft" else sys.executable
    shared = ["--rounds", str(a.rounds), "--inner-steps", str(a.inner_steps), "--n-layer", str(a.n_layer),
              "--n-embd", str(a.n_embd)]
    procs, logs = [], [tmp / f"{system}{rank}.log" for rank in (0, 1)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    try:
        for rank in (0, 1):
            with open(logs[rank], "w") as log:
                procs.append(subprocess.Popen([python, __file__, "--worker", system, "--rank", str(rank), "--tmp",
                                               str(tmp), *shared], stdout=log, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))
        deadline = time.monotonic() + a.timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{system}: no result in {a.timeout:.0f}s\n" + "".join(l.read_text()[-2000:] for l in logs))
    finally:
        for p in procs:
            reap(p)
    if any(p.returncode for p in procs):
        raise SystemExit(f"{system}: a worker failed\n" + "".join(l.read_text()[-3000:] for l in logs))
    return [json.loads((tmp / f"{system}{rank}.json").read_text()) for rank in (0, 1)]


def summarize(peers: list[dict], parts: tuple[str, ...]) -> dict:
    rows = [r for peer in peers for r in peer["rounds"][1:]]  # round 1 is warm-up (connections, first quorum)
    out = {}
    for k in parts:
        values = [r[k] for r in rows if r.get(k) is not None]
        if values:
            out[k] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    match = peers[0]["digest"] == peers[1]["digest"] and peers[0]["outer_step"] == peers[1]["outer_step"]
    for rank, peer in enumerate(peers):
        print(f"  peer {rank}: outer step {peer['outer_step']} digest {peer['digest'][:16]}")
    return {"peers": peers, "summary": out, "replicas_match": match,
            "inner_step_s": statistics.median(p["inner_step_s"] for p in peers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds per system (the first is warm-up)")
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--only", choices=("swarmloco", "torchft"))
    ap.add_argument("--torchft-python", default=sys.executable, help="the interpreter of torchft's workers")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per system at most")
    ap.add_argument("--out", default="runs/bench_sync.json")
    ap.add_argument("--worker", choices=("swarmloco", "torchft"), help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        torch.set_num_threads(1)
        tmp = Path(a.tmp)
        result = (swarmloco_worker if a.worker == "swarmloco" else torchft_worker)(a, a.rank, tmp)
        publish(tmp / f"{a.worker}{a.rank}.json", json.dumps(result))
        return

    systems = [a.only] if a.only else ["swarmloco", "torchft"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "loadavg_at_start": os.getloadavg()},
        "config": {"rounds": a.rounds, "warmup_rounds": 1, "inner_steps": a.inner_steps, "n_layer": a.n_layer,
                   "n_embd": a.n_embd, "params": num_params(build(a)), "batch": 8, "block": 64, "peers": 2,
                   "inner": "AdamW lr 1e-3", "outer": "SGD nesterov lr 0.7 momentum 0.9", "wire": "fp32",
                   "threads_per_worker": 1}}
    with tempfile.TemporaryDirectory(prefix="bench_sync_") as tmp:
        for system in systems:
            print(f"{system}: {a.rounds} rounds x {a.inner_steps} inner steps, 2 peers ...", flush=True)
            t0 = time.perf_counter()
            peers = run_system(a, system, Path(tmp))
            result[system] = summarize(peers, SWARMLOCO_PARTS if system == "swarmloco" else TORCHFT_PARTS)
            result[system]["wall_s"] = time.perf_counter() - t0
    print(f"\n{'system':10} {'figure (s, rounds 2..R, both peers)':36} {'median':>8} {'min':>8} {'max':>8}  match")
    for system in systems:
        for k, s in result[system]["summary"].items():
            print(f"{system:10} {k:36} {s['median']:8.3f} {s['min']:8.3f} {s['max']:8.3f}  "
                  f"{result[system]['replicas_match']}")
        print(f"{system:10} {'inner step (fwd+bwd+AdamW)':36} {result[system]['inner_step_s']:8.3f}")
    result["machine"]["loadavg_at_end"] = os.getloadavg()  # a shared machine: how busy it was
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted (the workers were reaped)") from None
