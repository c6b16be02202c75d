"""Start one peer process: checks, status endpoint, transport, peer, clean shutdown.

Order matters to an operator: every input is checked (:mod:`swarmloco.app.preflight`: device, codec,
data, ports) and the status endpoint is bound *before* hivemind's DHT node and p2pd start and before a
join address is printed, so a bad input is one line and exit 2 (or 1 for a taken port), never a peer
that comes up and then dies.

On a stop (:mod:`swarmloco.app.stopping`) the peer leaves the swarm and writes its checkpoint, then the
transport shuts hivemind's averager, DHT and p2pd down and kills whatever is left of their process groups
(:mod:`swarmloco.protocol.processes`: they lead their own groups and die with a peer that is SIGKILLed).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from swarmloco.config import RunConfig
from swarmloco.app import preflight
from swarmloco.node.checkpoint import list_checkpoints
from swarmloco.app.console import ConsoleReporter, one_line, say
from swarmloco.node.membership import AccessRefused
from swarmloco.app.peer import Peer, PeerOptions, prepare_config
from swarmloco.node.status import JsonLinesReporter, StatusBoard, TeeReporter
from swarmloco.app.stopping import install_stop_handlers
from swarmloco.protocol.bootstrap import Stopped
from swarmloco.protocol.identity import Identity, p2pd_key_file
from swarmloco.protocol.manifest import ManifestMismatch
from swarmloco.protocol.interface import TransportDied

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_MANIFEST = 0, 1, 2, 3
STATUS_LINGER = 2.0
"""A status endpoint that was read recently stays up this long after the peer stopped, so a monitor
sees the node's last state ("stopped") rather than a dead endpoint."""


def start_monitor(port: int, initial_peers: list[str], run_id: str, stop: threading.Event,
                  attached: str = "node") -> subprocess.Popen:
    """``swarmloco monitor`` in the foreground of this terminal; quitting it sets ``stop`` (``attached``:
    what quitting stops, "node" or "demo", which its help text says)."""
    args = [sys.executable, "-m", "swarmloco", "monitor", "--node", str(port), "--run", run_id,
            "--attached", attached]
    for m in initial_peers[:1]:
        args += ["--initial-peers", m]
    monitor = subprocess.Popen(args)

    def watch() -> None:
        monitor.wait()
        stop.set()

    threading.Thread(target=watch, name="monitor-watch", daemon=True).start()
    return monitor


def stop_monitor(monitor: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """Ask the monitor to quit (SIGTERM: it leaves its DHT in order) and wait for it; kill it if it hangs."""
    if monitor is None:
        return
    if monitor.poll() is None:
        monitor.terminate()
    try:
        monitor.wait(timeout)
    except subprocess.TimeoutExpired:
        monitor.kill()
        monitor.wait(5)


def write_maddrs(path: str, maddrs: list[str]) -> None:
    """Write this node's addresses atomically (tests and scripts wait for the file, then read it whole)."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text("\n".join(maddrs) + "\n")
    os.replace(tmp, path)


def start_dht_node(swarm, identity: Identity, record_validators=(), stop: threading.Event | None = None):
    """A DHT-only node (join, init-run, bootstrap) running with ``identity``'s key. Like a peer's
    transport, its processes lead their own process group and die with us (they are stopped in order)."""
    from swarmloco.protocol.transport import DhtClient

    with tempfile.TemporaryDirectory(prefix="swarmloco-key-") as keydir:  # p2pd has read the key once started
        return DhtClient(swarm, identity_path=p2pd_key_file(identity, keydir),
                         record_validators=list(record_validators), stop=stop)


def run_peer(cfg: RunConfig, options: PeerOptions, *, json_events: bool = False,
             maddrs_file: str | None = None, status_server_factory=None, tui: bool = False,
             identity: Identity | None = None, dht=None, stop: threading.Event | None = None,
             out: Callable[[str], None] = say) -> int:
    """Run one peer until it stops; returns the process exit code.

    ``identity`` and ``dht``: a key and a DHT node already started with it (``swarmloco join``: a
    DhtClient's node, handed over); the DHT node is shut down here whatever happens. ``stop``: set by the
    caller's signal handlers (and by the monitor quitting, with ``tui``). ``out``: where this peer's lines
    go (stderr; the log file under ``--tui``)."""
    from swarmloco.node.swarm import Swarm
    from swarmloco.protocol.transport import route_hivemind_logs

    route_hivemind_logs()
    stop = stop or threading.Event()
    board = StatusBoard()
    status_server = swarm = None
    try:
        if cfg.access.private and not cfg.access.owner:
            raise preflight.Refused("access.private needs access.owner, the key that signs tokens "
                                    "(swarmloco init-run sets it)")
        preflight.check_peer_options(cfg, shard=options.shard, inner_steps=options.inner_steps,
                                     max_outer_steps=options.max_outer_steps, resume=options.resume)
        preflight.check_device(options.device)
        preflight.check_codec(cfg)
        preflight.check_writable_dir(cfg.checkpoint.dir, "checkpoint.dir")
        if dht is None:
            preflight.check_listen_maddrs(cfg.swarm.host_maddrs, "swarm.host_maddrs")
        try:
            cfg = prepare_config(cfg)  # a bad model or data source is one line
            swarm = Swarm(cfg.run_id, config=cfg.swarm, identity=identity, stop=stop)
        except ValueError as e:
            raise preflight.Refused(str(e)) from None
        corpus = preflight.load_corpus(cfg)  # data problems before the DHT node, not after its address
        if (cfg.status.port or tui) and status_server_factory is not None:
            try:
                status_server = status_server_factory(board.snapshot, cfg.status.port)
            except OSError as e:
                raise preflight.Refused(f"status.port {cfg.status.port}: cannot listen on 127.0.0.1:"
                                        f"{cfg.status.port} ({e.strerror or e}); pick another --status-port (or 0: off)",
                                        EXIT_ERROR) from None
    except preflight.Refused as e:
        say(f"swarmloco: {e}")
        if dht is not None:
            from swarmloco.protocol.transport import shutdown_dht

            shutdown_dht(dht)
        return e.exit_code

    if threading.current_thread() is threading.main_thread():
        install_stop_handlers(stop)  # from here on a signal is a clean stop
    if not cfg.swarm.initial_peers:
        out("swarmloco: no --initial-peers given: starting a new swarm")
    monitor, last_word = None, None
    try:
        try:
            swarm.start(dht=dht)
        except Stopped:  # a stop signal while waiting for the initial peers: a clean stop
            return 0
        except Exception as e:  # noqa: BLE001 - cannot reach the swarm or bind: one line, non-zero exit
            say(f"swarmloco: could not start the swarm node: {one_line(e)}")
            return EXIT_ERROR
        H = options.inner_steps or cfg.inner.steps
        console = ConsoleReporter(out, last_round=lambda: board.get("last_round"), inner_steps=H,
                                  run_inner_steps=cfg.inner.steps, quiet=stop)
        board.reporter = TeeReporter(console, JsonLinesReporter()) if json_events else console  # (line first)
        try:
            peer = Peer(cfg, swarm, options, board=board, corpus=corpus)
        except ValueError as e:  # config that only shows up once the model exists (its vocabulary...)
            say(f"swarmloco: {e}")
            return EXIT_CONFIG
        except MemoryError:
            say("swarmloco: [model]: the model does not fit in this machine's memory; use a smaller one")
            return EXIT_CONFIG
        except Exception as e:  # noqa: BLE001 - the averager could not start
            say(f"swarmloco: could not start the swarm node: {one_line(e)}")
            return EXIT_ERROR
        maddrs = swarm.visible_maddrs()
        manifest = peer.diloco.manifest
        out(f"swarmloco: peer {swarm.peer_id} of run '{manifest.run_id}' (manifest {manifest.short})")
        for m in maddrs:
            out(f"swarmloco: listening on {m}")
        if maddrs and not cfg.swarm.initial_peers:
            out(f"swarmloco: others join with: --initial-peers {maddrs[0]}")
        if maddrs_file:
            write_maddrs(maddrs_file, maddrs)
        if stop.is_set():  # a signal while the node was starting: leave before joining anything
            return EXIT_OK
        if status_server is not None:
            out(f"swarmloco: status on http://127.0.0.1:{status_server.port}/status")
        if tui and status_server is not None:
            monitor = start_monitor(status_server.port, maddrs, manifest.run_id, stop)
        out(_start_line(peer, cfg, H))
        if H > cfg.inner.steps:
            out(f"swarmloco: warning: --inner-steps {H} is larger than the run's inner.steps = {cfg.inner.steps}: "
                "the other peers will average without this peer's work (or wait for it)")
        if options.resume:
            out(_resume_line(cfg, manifest))
        try:
            steps = peer.run()
        except (ManifestMismatch, AccessRefused) as e:
            last_word = f"swarmloco: refused: {e}"
            return EXIT_MANIFEST
        except (FloatingPointError, TransportDied) as e:  # the local model diverged, or hivemind's averager
            last_word = f"swarmloco: stopping: {e}"  # died: say so in one line, leave cleanly
            return EXIT_ERROR
        logger.info("stopped after %d outer steps (now at outer step %d)", steps, peer.outer_step)
        return EXIT_OK
    finally:
        stop_monitor(monitor)
        if last_word:  # (after the monitor gave the terminal back)
            out(last_word)
            if out is not say:
                say(last_word)
        swarm.close()
        if status_server is not None:
            _close_status(status_server, linger=monitor is None)  # (our own monitor is gone already)


def _start_line(peer: Peer, cfg: RunConfig, H: int) -> str:
    ckpt = f"checkpoints every {cfg.checkpoint.every} in {cfg.checkpoint.dir}" if cfg.checkpoint.dir else \
        "no checkpoints (--checkpoint-dir DIR to keep them)"
    n = sum(p.numel() for p in peer.model.parameters())  # (the CLI's peer: its own model)
    return (f"swarmloco: training on {peer.device}: {n / 1e6:.2f}M parameters, data shard {peer.shard}, "
            f"{H} inner steps per outer step, {ckpt}; one line per outer step follows")


def _resume_line(cfg: RunConfig, manifest) -> str:
    ours = list_checkpoints(cfg.checkpoint.dir, manifest.hash)
    if not ours:
        return (f"swarmloco: --resume: no checkpoint of this run (manifest {manifest.short}) in "
                f"{cfg.checkpoint.dir}; starting from the swarm's state, or from outer step 0")
    return f"swarmloco: --resume: from outer step {ours[-1].outer_step} ({ours[-1].path})"


def _close_status(server, linger: bool = True) -> None:
    """Close the status endpoint; if a monitor is reading it, first let it see the final state."""
    last = getattr(server, "last_request", None)
    if linger and callable(last) and last() is not None and time.monotonic() - last() < 5.0:
        seen = last()
        deadline = time.monotonic() + STATUS_LINGER
        while time.monotonic() < deadline and last() == seen:
            time.sleep(0.05)
    server.close()
