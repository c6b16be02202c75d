"""WAN benchmark: a swarm of peers, each in its own network namespace, on an emulated slow link, per *arm*.

An arm is a named set of config overrides (``ARMS``: none, delayed, eager, streaming4); every arm runs the
same number of inner steps (``--outer-steps N`` rounds of ``--inner-steps H``; an arm with
``outer.fragments = F`` runs ``N*F`` fragment rounds: ``--max-outer-steps N*F``) on each link setting
(``LINKS``), and reports, from the peers' ``--json-events`` round records (timestamped when read) and the
link's byte counters:

* ``util``: compute utilization of the training loop, ``sum(compute_s) / sum(compute_s + blocked_s)`` over a
  peer's rounds but its first (start-up) and last (a peer that stops waits for its last round to land),
  mean over peers: ``compute_s`` is the time its inner steps took in a round's phase, ``blocked_s`` the time
  the loop spent on that round instead (the whole sync when blocking; starting it, waiting for it to land
  and applying it when overlapped); ``util_b`` is the same figure read as ``1 - blocked / wall``;
* ``samp/s``: samples of those rounds over the same time, summed over peers;
* ``MB/rnd``: bytes per round per peer (``bytes_sent + bytes_received``, mean over records); ``MB/H``: per
  H inner steps (the same without fragments);
* ``pk MB/s``: peak bytes/s on the wire, from the hub side of each peer's veth (tx+rx counters sampled every
  0.1 s by a thread inside the hub namespace, from ``/proc/thread-self/net/dev``: the same netdev counters
  as ``/sys/class/net/<dev>/statistics`` there), the largest 1-s window per peer, max over peers; ``pk
  mean``: the mean over peers of the same;
* ``eval``: the held-out loss after N*H inner steps: ``eval_loss`` at outer step N*F, mean over peers (all
  equal when the replicas are in sync: see ``eval_at_target_same_on_all_peers``, ``digests_at_target_equal``);
* ``other``: CPU cores used by processes that are not this benchmark's during the arm (another job on the
  machine makes an arm's timings unclean: a warning says so).

The emulated WAN (``scripts/wan/emulated.py``, the recipe of /work/shared/wan): one namespace per peer with
a veth to a bridge in a hub namespace, ``tc tbf`` (burst 256kb, latency 50ms) on both ends of each veth
(the peer's uplink and its downlink), and latency as an NFQUEUE helper (``scripts/wan/nfqdelay.c``,
compiled into the work dir) holding every packet that enters a peer namespace for DELAY ms (the kernel has
no netem). ``100mbit``: 100 Mbit/s each way, 25 ms on each peer's ingress (50 ms RTT); ``20mbit``: 20 Mbit/s
each way, no added delay;
``lan``: 1 Gbit/s, no added delay (with ``--overlap-steps T``: the loss of overlapped rounds landing after
exactly T inner steps, against blocking rounds, in a real swarm).
Each setting is checked before its arms with a raw TCP stream between two peer namespaces
(``scripts/wan/socktest.py``: RTT and throughput go to the JSON). Addresses 10.77.0.0/24 exist only inside
these namespaces; every namespace is named ``swlwan<PID>-...``, and all the state (veths, bridge, qdiscs,
iptables rules, helpers, peers) lives inside them, so killing what runs in them and deleting them removes
all of it: on exit, on an exception, on SIGINT/SIGTERM/SIGHUP; the namespaces of a killed run (``swlwan<PID>``
whose PID is no longer a bench_wan) are removed at start. Needs root (exit 2 otherwise); installs
``iproute2 iptables libnetfilter-queue-dev gcc`` with apt-get when missing.

Defaults (4 peers on 2 CPU cores): a 6x256 byte GPT (4.8M params), H = 100, N = 6, fp32 pseudo-gradients
(codec none): a blocking round moves ~29 MB each way per peer, ~12 s at 20mbit against ~40 s of inner
steps (blocking utilization below 0.8 there); an arm takes ~6 minutes. The overlapped arms land a round as
soon as it has arrived (``overlap_steps = 0``).

    sudo .venv/bin/python scripts/bench_wan.py                                 # all arms, both links
    sudo .venv/bin/python scripts/bench_wan.py --arms none --links 20mbit --outer-steps 3
    sudo .venv/bin/python scripts/bench_wan.py --links lan --arms none delayed streaming4 --overlap-steps 10 \
        --n-layer 2 --n-embd 64 --outer-steps 20 --eval-batches 32        # quality, a real swarm

Output: a table on stdout and ``--out`` (default runs/bench_wan.json): machine, date, link checks, settings,
per arm and link the figures above, per-peer figures, CPU load, and every raw round record.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan.emulated import (LINKS, NS_PREFIX, SUBNET, TBF, CpuTracker, Sampler, Wan, build_helper,  # noqa: E402
                          delete_namespaces, ensure_tools, kill_ns_processes, link_check, log, netns_list,
                          remove_stale, wire_stats)
from wan.summary import fmt, print_table, resummarize, summarize  # noqa: E402

EVENT_PREFIX = "@@swarmloco "

ARMS: list[tuple[str, dict]] = [
    ("none", {}),
    ("delayed", {"outer": {"overlap": "delayed"}}),
    ("eager", {"outer": {"overlap": "eager"}}),
    ("streaming4", {"outer": {"overlap": "delayed", "fragments": 4}}),
]


class Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP: unwind through every finally (cleanup), then exit 130."""


# ---------------------------------------------------------------------------------------------- peers

class Peer:
    """``python -m swarmloco run`` inside a namespace, in its own session; round records timestamped as read."""

    def __init__(self, index: int, cmd: list[str], log_path: Path, env: dict):
        self.index, self.log_path = index, log_path
        self.maddrs_file: Path | None = None
        self.logf = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.logf, text=True, env=env,
                                     start_new_session=True)
        self.records: list[dict] = []
        self.events: list[dict] = []
        self.fresh: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            t, wall = time.monotonic(), time.time()
            if not line.startswith(EVENT_PREFIX):
                continue
            try:
                ev = json.loads(line[len(EVENT_PREFIX):])
            except json.JSONDecodeError:
                continue
            ev["t_read"], ev["time_read"] = t, wall
            if ev.get("type") == "round":
                self.records.append(ev)
                self.fresh.put(ev)
            else:
                self.events.append(ev)

    def log_tail(self, n: int = 600) -> str:
        if not self.logf.closed:
            self.logf.flush()
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def last_log_line(self) -> str:
        lines = [line for line in self.log_tail(4000).splitlines() if line.strip()]
        return lines[-1].strip() if lines else f"(nothing in {self.log_path})"

    def kill(self) -> None:
        """SIGKILL the peer's process group and every process of its session (hivemind's helpers lead their own)."""
        sid = self.proc.pid
        try:
            os.killpg(sid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) == sid:
                        os.kill(int(entry), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.logf.close()


def make_config(args, tag: str, arm: str, overrides: dict, i: int, addr: str) -> dict:
    base = {
        "run_id": "bench-wan",  # the same manifest in every arm and link: only the overrides differ
        "seed": args.seed,
        "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head, "block_size": args.block_size},
        "data": {"max_bytes": args.max_bytes, "batch_size": args.batch_size, "eval_batches": args.eval_batches,
                 "num_shards": max(8, args.peers)},
        "inner": {"steps": args.inner_steps, "lr": args.lr, "warmup_steps": min(50, args.outer_steps * args.inner_steps // 10),
                  "total_steps": args.outer_steps * args.inner_steps},
        "outer": {},
        "codec": {"name": args.codec},
        "swarm": {"host_maddrs": [f"/ip4/{addr}/tcp/0"], "min_peers": args.peers, "ready_timeout": 120.0,
                  "matchmaking_time": 5.0, "request_timeout": 3.0, "allreduce_timeout": 180.0,
                  "next_chunk_timeout": 60.0, "heartbeat_period": 2.0, "heartbeat_ttl": 30.0, "state_timeout": 60.0},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            base.setdefault(section, {}).update(values)
        else:
            base[section] = values
    return base


def n_params(args) -> int:
    e, L, v, b = args.n_embd, args.n_layer, 256, args.block_size
    return L * (12 * e * e + 13 * e) + v * e + b * e + 2 * e  # blocks (+biases, norms), tied embeddings, pos, final norm


def run_arm(args, wan: Wan, sampler: Sampler, arm: str, overrides: dict, workdir: Path) -> dict:
    from swarmloco.config import ConfigError, config_from_dict, dump_toml

    fragments = int(overrides.get("outer", {}).get("fragments", 1))
    rounds = args.outer_steps * fragments
    armdir = workdir / f"{wan.link}-{arm}"
    armdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"arm": arm, "link": wan.link, "overrides": overrides, "fragments": fragments,
                    "max_outer_steps": rounds, "workdir": str(armdir)}
    paths = []
    try:
        for i in range(args.peers):
            cfg = config_from_dict(make_config(args, wan.tag, arm, overrides, i, wan.addr(i)))
            path = armdir / f"p{i}.toml"
            path.write_text(dump_toml(cfg))
            paths.append(path)
        result["config"] = make_config(args, wan.tag, arm, overrides, 0, wan.addr(0))
    except ConfigError as e:
        result.update(status="refused", error=str(e))
        return result
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    peers: list[Peer] = []
    cpu = CpuTracker({h.pid for h in wan.helpers})
    t_start = time.monotonic()
    deadline = t_start + args.arm_timeout
    try:
        def start(i: int, seeds: list[str]) -> Peer:
            maddrs = armdir / f"p{i}.maddrs"
            cmd = [*wan.exec_prefix(i), args.python, "-m", "swarmloco", *(["-v"] if args.verbose_peers else []), "run",
                   str(paths[i]), "--json-events", "--maddrs-file", str(maddrs), "--max-outer-steps", str(rounds),
                   "--shard", str(i), "--device", "cpu"]
            for m in seeds:
                cmd += ["--initial-peers", m]
            peer = Peer(i, cmd, armdir / f"p{i}.log", env)
            cpu.sids.add(peer.proc.pid)
            peer.maddrs_file = maddrs
            peers.append(peer)
            return peer

        boot = start(0, [])
        while not (boot.maddrs_file.exists() and boot.maddrs_file.read_text().strip()):
            if boot.proc.poll() is not None:
                raise PeerFailed(f"bootstrap peer exited with {boot.proc.returncode}: {boot.last_log_line()}")
            if time.monotonic() > min(deadline, t_start + 180):
                raise TimeoutError("bootstrap peer published no address in 180 s")
            time.sleep(0.1)
        seeds = [m for m in boot.maddrs_file.read_text().split() if f"/ip4/{SUBNET}." in m]
        if not seeds:
            raise PeerFailed(f"no {SUBNET}.x address among the bootstrap's {boot.maddrs_file.read_text().split()}")
        for i in range(1, args.peers):
            start(i, seeds[:1])
        # wait (bounded) for every peer to exit by itself after its last round
        while any(p.proc.poll() is None for p in peers):
            for p in peers:
                while True:
                    try:
                        ev = p.fresh.get_nowait()
                    except queue.Empty:
                        break
                    if p.index == 0 or not ev.get("ok"):
                        print(f"  [{wan.link}/{arm}] p{p.index} outer {ev.get('outer_step'):3} "
                              f"{'ok ' if ev.get('ok') else 'FAILED'} eval {ev.get('eval_loss', float('nan')):.4f} "
                              f"round {ev.get('round_time', 0):6.1f}s compute {ev.get('compute_s', float('nan')):6.1f}s "
                              f"bytes {(ev.get('bytes_sent', 0) + ev.get('bytes_received', 0)) / 1e6:6.2f} MB "
                              f"peers {ev.get('peers')}", flush=True)
            failed = [p for p in peers if p.proc.poll() not in (None, 0)]
            if failed:
                p = failed[0]
                raise PeerFailed(f"p{p.index} exited with {p.proc.returncode}: {p.last_log_line()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"arm did not finish in {args.arm_timeout:.0f} s (rounds read: "
                                   f"{[len(p.records) for p in peers]} of {rounds})")
            if wan.helpers and not wan.helpers_alive():
                raise PeerFailed("an nfqdelay helper died (the link drops every packet)")
            cpu.sample()
            time.sleep(0.2)
        result["status"] = "ok"
    except PeerFailed as e:
        result.update(status="failed", error=str(e))
    except TimeoutError as e:
        result.update(status="timeout", error=str(e))
    finally:
        t_end = time.monotonic()
        cpu_result = cpu.result()
        for p in peers:
            p.kill()
        for ns in wan.peer_ns:  # anything of the arm still running in the peer namespaces (not the delay helpers)
            kill_ns_processes(ns, grace=1.0, keep=tuple(h.pid for h in wan.helpers))
        for p in peers:
            p.reader.join(2)
    result["wall_s"] = t_end - t_start
    result["cpu"] = cpu_result
    result["exit_codes"] = [p.proc.returncode for p in peers]
    result["records"] = {f"p{p.index}": p.records for p in peers}
    result["other_events"] = {f"p{p.index}": p.events[-20:] for p in peers}
    if result["status"] != "ok":
        result["log_tails"] = {f"p{p.index}": p.log_tail(1500) for p in peers}
    result.update(summarize(peers, args, rounds, result["fragments"]))
    result["wire"] = wire_stats(sampler.samples, t_start, t_end, args.peers)
    if result.get("t_first") is not None:
        result["wire_measured_window"] = wire_stats(sampler.samples, result["t_first"], result["t_last"], args.peers)
    return result


class PeerFailed(Exception):
    pass


def machine_info() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = 0
    try:
        mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "swarmloco"],
                                capture_output=True, text=True).stdout.strip())
    try:
        import torch
        torch_version = torch.__version__
    except Exception:  # noqa: BLE001
        torch_version = None
    return {"hostname": socket.gethostname(), "cpu": cpu, "cpus": os.cpu_count(), "mem_bytes": mem,
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch_version,
            "git_commit": commit, "swarmloco_dirty": dirty}


def main() -> int:
    arm_names = [a for a, _ in ARMS]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--arms", nargs="+", choices=arm_names, default=arm_names, help="arms to run, in this order")
    ap.add_argument("--links", nargs="+", choices=list(LINKS), default=["100mbit", "20mbit"], help="link settings")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--outer-steps", type=int, default=6, help="N: rounds per arm (x fragments), >= 2")
    ap.add_argument("--inner-steps", type=int, default=100, help="H = inner.steps")
    ap.add_argument("--overlap-steps", type=int, default=0,
                    help="outer.overlap_steps of the overlapped arms (0: land as soon as a round arrived)")
    ap.add_argument("--codec", default="none")
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3, help="inner lr")
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--max-bytes", type=int, default=4_000_000, help="data.max_bytes (stdlib sources)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arm-timeout", type=float, default=1200.0, help="seconds before a stuck arm is killed")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the peers (with swarmloco)")
    ap.add_argument("--workdir", default=None, help="configs, logs, maddrs (default: a new /tmp/bench_wan-*)")
    ap.add_argument("--verbose-peers", action="store_true", help="peers log with -v")
    ap.add_argument("--out", default="runs/bench_wan.json")
    ap.add_argument("--resummarize", metavar="JSON",
                    help="recompute the summaries of a finished run's JSON from its round records into --out")
    args = ap.parse_args()
    if args.resummarize:
        return resummarize(Path(args.resummarize), Path(args.out))
    if os.geteuid() != 0:
        print("bench_wan: needs root (network namespaces, tc, iptables): run it with sudo", file=sys.stderr)
        return 2
    if args.outer_steps < 2 or args.peers < 2 or args.peers > 200:
        ap.error("--outer-steps must be >= 2 and --peers in 2..200")

    def on_signal(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    tag = f"{NS_PREFIX}{os.getpid()}"
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_wan-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    report: dict = {
        "benchmark": "bench_wan", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv, "machine": machine_info(), "workdir": str(workdir), "links": LINKS, "tbf": TBF,
        "arms_defined": {a: o for a, o in ARMS}, "params": n_params(args),
        "settings": {k: v for k, v in vars(args).items() if k != "python"},
        "link_checks": {}, "results": [], "interrupted": None, "errors": [],
    }
    log(f"{args.peers} peers, model {args.n_layer}x{args.n_embd} (~{n_params(args) / 1e6:.2f}M params), H={args.inner_steps}, "
        f"N={args.outer_steps}, codec {args.codec}; arms {' '.join(args.arms)}; links {' '.join(args.links)}; "
        f"logs in {workdir}")
    wan: Wan | None = None
    sampler: Sampler | None = None
    code = 0
    try:
        ensure_tools()
        remove_stale()
        helper = build_helper(workdir)
        for link in args.links:
            wan = Wan(tag, args.peers, link, helper, workdir)
            wan.up()
            sampler = Sampler(wan.hub, args.peers)
            sampler.start()
            sampler.ready.wait(5)
            if sampler.error:
                report["errors"].append(f"{link}: sampler: {sampler.error}")
            check = link_check(wan, sys.executable)
            report["link_checks"][link] = check
            log(f"link {link}: TCP RTT {check['rtt_ms_median']:.1f} ms (min {check['rtt_ms_min']:.1f}), "
                f"{check['mbit_s']:.1f} Mbit/s ({check['mib']} MiB in {check['seconds']:.1f} s)")
            for arm in args.arms:
                overrides = dict(ARMS)[arm]
                if args.overlap_steps and "overlap" in overrides.get("outer", {}):
                    overrides = {**overrides, "outer": {**overrides["outer"], "overlap_steps": args.overlap_steps}}
                log(f"arm {arm} on {link}: {json.dumps(overrides)}")
                res = run_arm(args, wan, sampler, arm, overrides, workdir)
                report["results"].append(res)
                if res["status"] == "ok":
                    log(f"arm {arm} on {link}: util {fmt(res.get('util_compute'), '.3f')} (blocked-based "
                        f"{fmt(res.get('util_blocked'), '.3f')}), {fmt(res.get('samples_per_s'), '.1f')} samples/s, "
                        f"{fmt(res.get('bytes_per_round_per_peer'), '.2f', 1e6)} MB/round/peer, peak "
                        f"{fmt(res['wire'].get('peak_Bps_max'), '.2f', 1e6)} MB/s, eval {fmt(res.get('eval_loss'), '.4f')}, "
                        f"{res['wall_s']:.0f} s; other load {fmt(res['cpu'].get('other_cores'), '.2f')} cores")
                else:
                    log(f"arm {arm} on {link}: {res['status']}: {(res.get('error') or '?').splitlines()[0][:300]}")
                if (res.get("cpu") or {}).get("other_cores", 0) > 0.2 and res["cpu"]["span_s"] > 10:
                    log(f"warning: other processes used {res['cpu']['other_cores']:.2f} of {os.cpu_count()} cores "
                        f"during arm {arm} on {link}: its timings are not clean")
                with open(workdir / "partial.json", "w") as f:  # progress survives a kill -9
                    json.dump(report, f, default=str)
            sampler.stop()
            sampler = None
            failed = wan.down()
            wan = None
            if failed:
                report["errors"].append(f"could not delete namespaces {failed}")
    except Interrupted as e:
        report["interrupted"] = str(e)
        log(f"interrupted by {e}: cleaning up")
        code = 130
    except Exception as e:  # noqa: BLE001 - reported, then cleanup
        report["errors"].append(f"{type(e).__name__}: {e}")
        log(f"error: {type(e).__name__}: {e}")
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # cleanup is not to be interrupted
            signal.signal(sig, signal.SIG_IGN)
        if sampler is not None:
            sampler.stop()
        if wan is not None:
            failed = wan.down()
            if failed:
                report["errors"].append(f"could not delete namespaces {failed}")
        leftovers = [ns for ns in netns_list() if ns.startswith(tag + "-")]
        if leftovers:
            delete_namespaces(leftovers)
            leftovers = [ns for ns in netns_list() if ns.startswith(tag + "-")]
        report["cleanup_leftover_namespaces"] = leftovers
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1, default=str)
        if report["results"]:
            print_table(report["results"])
        log(f"wrote {out}" + (f"; namespaces left behind: {leftovers}" if leftovers else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
