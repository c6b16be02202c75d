"""``swarmloco demo``: a local swarm of N peers, each its own OS process, on loopback.

The first peer starts the swarm and writes its multiaddrs to a file; the others join through it.
Each peer trains on its own shard of the corpus (shard i for peer i) and prints machine-readable
round summaries that this launcher folds into one line per outer step (units, peer ids and round time
as everywhere: :mod:`swarmloco.app.console`).

Stopping: Ctrl-C, SIGTERM or SIGHUP once (to the demo or its whole process group; the peers run in
sessions of their own) prints one line, sends SIGTERM to every peer, waits for their clean exit (each
leaves the swarm), kills whatever is left of their sessions and exits 0; a second signal kills them all
at once (exit 130). With ``--tui``, quitting the monitor stops the demo the same way; a demo that
finished keeps its monitor open (the node shows as stopped) until ``q``.
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from swarmloco.config import RunConfig, dump_toml
from swarmloco.app.console import say
from swarmloco.display import fmt_bytes
from swarmloco.app.launcher import start_monitor, stop_monitor
from swarmloco.node.status import JsonLinesReporter
from swarmloco.protocol.processes import signal_session

STARTUP_TIMEOUT = 90.0


def demo_config(base: RunConfig, peers: int) -> RunConfig:
    """The demo's swarm section: loopback, wait for all peers before the first round."""
    swarm = base.swarm.__class__(**{**base.swarm.__dict__, "host_maddrs": ("/ip4/127.0.0.1/tcp/0",),
                                    "min_peers": peers, "initial_peers": ()})
    return base.replace(swarm=swarm)


class _PeerProc:
    def __init__(self, index: int, args: list[str], log_path: Path, events: queue.Queue):
        self.index, self.log_path = index, log_path
        self.log = open(log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                     start_new_session=True)
        self.reader = threading.Thread(target=self._read, args=(events,), daemon=True)
        self.reader.start()

    def _read(self, events: queue.Queue) -> None:
        for line in self.proc.stdout:
            if line.startswith(JsonLinesReporter.PREFIX):
                try:
                    events.put((self.index, json.loads(line[len(JsonLinesReporter.PREFIX):])))
                except json.JSONDecodeError:
                    pass
        events.put((self.index, {"type": "exit"}))

    def terminate(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def reap(self, timeout: float) -> int | None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        signal_session(self.proc.pid, signal.SIGKILL)  # hivemind helpers and p2pd: none may outlive it
        if code is None:
            code = self.proc.wait(10)
        self.log.close()
        return code


def format_step_line(step: int, reports: list[dict], n_peers: int) -> str:
    ok = [r for r in reports if r.get("ok")]
    use = ok or reports
    def mean(key: str) -> float:
        """Over the peers that report a finite value (a peer that did no inner step this round has no loss)."""
        values = [float(r.get(key) or 0.0) for r in use]
        finite = [v for v in values if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else float("nan")

    digests = {r.get("digest") for r in ok}
    sync = "in sync" if len(digests) == 1 else f"{len(digests)} distinct models!"
    return (f"outer {step:3d} | train {mean('train_loss'):.4f} | eval {mean('eval_loss'):.4f} | "
            f"peers {max((r.get('peers') or 1) for r in use)}/{n_peers} | "
            f"{sum(float(r.get('samples_per_second') or 0) for r in use):7.0f} samples/s | "
            f"sent {fmt_bytes(mean('bytes_sent'))} recv {fmt_bytes(mean('bytes_received'))} per peer | "
            f"round {mean('round_time'):.1f}s | {sync}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(base: RunConfig, *, peers: int, outer_steps: int, inner_steps: int | None = None,
             workdir: str | None = None, out=sys.stdout, extra_args: tuple[str, ...] = (), tui: bool = False,
             collect: list[dict] | None = None) -> int:
    """Run the local swarm to completion; returns 0 when every peer exited cleanly.

    With ``tui``, peer 0 serves its status on a free local port and ``swarmloco monitor`` takes the
    terminal; the per-step lines go to ``demo.out`` in the work directory; quitting the monitor
    stops the swarm.
    """
    cfg = demo_config(base, peers)
    tmp_ctx = tempfile.TemporaryDirectory(prefix="swarmloco-demo-") if workdir is None else None
    root = Path(workdir or tmp_ctx.name)
    root.mkdir(parents=True, exist_ok=True)
    cfg_path = root / "demo.toml"
    cfg_path.write_text(dump_toml(cfg))
    status_port = _free_port() if tui else 0
    monitor: subprocess.Popen | None = None
    if tui:
        out = open(root / "demo.out", "w")
    events: queue.Queue = queue.Queue()
    procs: list[_PeerProc] = []
    stop, signalled = threading.Event(), threading.Event()

    def on_signal(signum, frame) -> None:
        if signalled.is_set():  # the second one: everything, now
            say("swarmloco demo: second signal, killing every peer now")
            for p in procs:
                signal_session(p.proc.pid, signal.SIGKILL)
            if monitor is not None:
                monitor.kill()
            os._exit(130)
        signalled.set()
        say(f"swarmloco demo: {signal.Signals(signum).name} received, stopping every peer cleanly "
            "(a second signal exits at once)")
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def peer_args(i: int, initial: list[str]) -> list[str]:
        args = [sys.executable, "-m", "swarmloco", "run", str(cfg_path), "--shard", str(i),
                "--max-outer-steps", str(outer_steps), "--json-events", *extra_args]
        if inner_steps:
            args += ["--inner-steps", str(inner_steps)]
        for m in initial:
            args += ["--initial-peers", m]
        if i == 0:
            args += ["--maddrs-file", str(root / "peer0.maddrs")]
            if status_port:
                args += ["--status-port", str(status_port)]
        return args

    print(f"swarmloco demo: {peers} peers, {outer_steps} outer steps of "
          f"{inner_steps or cfg.inner.steps} inner steps; logs in {root}", file=out, flush=True)
    exit_codes: list[int | None] = []
    finished = False
    try:
        procs.append(_PeerProc(0, peer_args(0, []), root / "peer0.log", events))
        maddr_file, deadline = root / "peer0.maddrs", time.monotonic() + STARTUP_TIMEOUT
        while not maddr_file.exists():
            if stop.is_set():
                return 0
            if procs[0].proc.poll() is not None or time.monotonic() > deadline:
                print(f"swarmloco demo: the first peer did not start; see {procs[0].log_path}", file=out)
                return 1
            time.sleep(0.1)
        initial = [m for m in maddr_file.read_text().split() if m][:1]
        for i in range(1, peers):
            procs.append(_PeerProc(i, peer_args(i, initial), root / f"peer{i}.log", events))
        if tui:
            monitor = start_monitor(status_port, initial, cfg.run_id, stop, attached="demo")

        reports: dict[int, list[dict]] = defaultdict(list)
        alive, printed = set(range(peers)), 0
        while alive and not stop.is_set():
            try:
                index, ev = events.get(timeout=0.5)
            except queue.Empty:
                continue
            if ev.get("type") == "exit":
                alive.discard(index)
            elif ev.get("type") == "round":
                if collect is not None:
                    collect.append({"peer": index, **ev})
                reports[int(ev["outer_step"]) if ev.get("ok") else -1].append(ev)
                if not ev.get("ok"):
                    print(f"  peer {index}: round failed: {ev.get('error')}", file=out, flush=True)
            while printed + 1 in reports and len(reports[printed + 1]) >= max(1, len(alive)):
                printed += 1
                print(format_step_line(printed, reports[printed], peers), file=out, flush=True)
        for step in sorted(k for k in reports if k > printed and not signalled.is_set()):
            print(format_step_line(step, reports[step], peers), file=out, flush=True)
        finished = not alive
        if finished and monitor is not None:  # the user looks at the finished run until they quit
            print("swarmloco demo: finished; quit the monitor with q", file=out, flush=True)
            while monitor.poll() is None and not stop.is_set():
                stop.wait(0.2)
    finally:
        stop_monitor(monitor)
        if stop.is_set() and not finished and not signalled.is_set():  # (a signal said so in its own line)
            print("swarmloco demo: stopping all peers", file=out, flush=True)
        for p in procs:
            if stop.is_set():
                p.terminate()
        for p in procs:
            code = p.reap(timeout=30.0 if not stop.is_set() else 20.0)
            exit_codes.append(code)
        for s, h in old.items():
            signal.signal(s, h)
        if tui:
            out.close()
    bad = [(i, c) for i, c in enumerate(exit_codes) if c != 0]
    if bad:
        print(f"swarmloco demo: peers exited with errors {bad}; logs kept in {root}", file=sys.stdout if tui else out,
              flush=True)
        return 1
    if tmp_ctx is not None:
        tmp_ctx.cleanup()
    return 0
