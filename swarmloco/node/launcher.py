"""Start one peer process: signals, transport, peer, clean shutdown.

Ctrl-C / SIGTERM set a stop flag: the peer finishes (or abandons) its current inner step, leaves the
swarm, writes its checkpoint and shuts hivemind's DHT, averager and p2pd down. SIGINT is ignored
while hivemind starts its helper processes, so a terminal's Ctrl-C (sent to the whole process
group) reaches only this process, which then stops its children in order instead of leaving them
half-dead. A second signal exits at once.

If the peer itself dies without a chance to clean up (SIGKILL, OOM killer), its hivemind helper
processes die with it: they are forked with ``PR_SET_PDEATHSIG`` (Linux). hivemind's p2pd daemon
exits on its own once its client has been gone for its idle timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from swarmloco.config import RunConfig
from swarmloco.node.membership import AccessRefused
from swarmloco.node.peer import Peer, PeerOptions, prepare_config
from swarmloco.node.status import JsonLinesReporter, NullReporter, StatusBoard
from swarmloco.protocol.identity import Identity
from swarmloco.protocol.manifest import ManifestMismatch

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_MANIFEST = 0, 1, 2, 3


_dying_with_parent = False


def die_with_parent() -> None:
    """Make every process forked from now on (hivemind's DHT and averager) get SIGKILL when we die."""
    global _dying_with_parent
    if not sys.platform.startswith("linux") or _dying_with_parent:
        return
    _dying_with_parent = True
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    forking = [0]

    def before() -> None:
        forking[0] = os.getpid()

    def in_child() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != forking[0]:  # the parent died between fork and prctl
            os._exit(1)

    os.register_at_fork(before=before, after_in_child=in_child)


def install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum, frame):
        if stop.is_set():
            print("swarmloco: second signal, exiting now", file=sys.stderr, flush=True)
            os._exit(130)
        print(f"swarmloco: {signal.Signals(signum).name} received, stopping cleanly "
              "(leaving the swarm, writing the checkpoint)", file=sys.stderr, flush=True)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal or SSH session closed
        signal.signal(sig, handler)


def start_monitor(port: int, initial_peers: list[str], run_id: str, stop: threading.Event) -> subprocess.Popen:
    """``swarmloco monitor`` in the foreground of this terminal; quitting it sets ``stop``."""
    args = [sys.executable, "-m", "swarmloco", "monitor", "--node", str(port), "--run", run_id]
    for m in initial_peers[:1]:
        args += ["--initial-peers", m]
    monitor = subprocess.Popen(args)

    def watch() -> None:
        monitor.wait()
        stop.set()

    threading.Thread(target=watch, name="monitor-watch", daemon=True).start()
    return monitor


def stop_monitor(monitor: subprocess.Popen | None) -> None:
    if monitor is not None and monitor.poll() is None:
        monitor.terminate()
        monitor.wait(10)


def load_identity(path: str) -> Identity:
    """The peer's key: loaded from ``path`` (created there if missing), or fresh for this run if empty.
    Raises ValueError with a one-line reason for an unreadable key file."""
    if not path:
        return Identity.generate()
    try:
        if not os.path.exists(path):
            identity = Identity.generate()
            identity.write_libp2p_key(path)
            logger.info("generated a new identity %s at %s", identity.libp2p_peer_id(), path)
            return identity
        return Identity.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"identity file {path}: {e}") from None


def p2pd_key_file(identity: Identity, workdir: str) -> str:
    """Write ``identity`` as the libp2p key p2pd reads (0600, in a private temp dir): p2pd then runs with the
    same key that signs our records, so our peer id inlines our public key."""
    path = os.path.join(workdir, "p2pd.key")
    identity.write_libp2p_key(path)
    return path


def write_maddrs(path: str, maddrs: list[str]) -> None:
    """Write this node's addresses atomically (tests and scripts wait for the file, then read it whole)."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text("\n".join(maddrs) + "\n")
    os.replace(tmp, path)


def start_dht_node(swarm, identity: Identity, record_validators=()):
    """A DHT-only node (join, init-run, bootstrap) running with ``identity``'s key. Like a peer's
    transport, its processes die with us and ignore the terminal's Ctrl-C (they are stopped in order)."""
    from swarmloco.protocol.transport import DhtClient

    die_with_parent()
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # children (and p2pd) inherit "ignore"
    try:
        with tempfile.TemporaryDirectory(prefix="swarmloco-key-") as keydir:  # p2pd has read the key once started
            return DhtClient(swarm, identity_path=p2pd_key_file(identity, keydir),
                             record_validators=list(record_validators))
    finally:
        signal.signal(signal.SIGINT, old_int)


def run_peer(cfg: RunConfig, options: PeerOptions, *, json_events: bool = False,
             maddrs_file: str | None = None, status_server_factory=None, tui: bool = False,
             identity: Identity | None = None, dht=None) -> int:
    """Run one peer until it stops; returns the process exit code.

    ``identity`` and ``dht``: a key and a DHT node already started with it (``swarmloco join``); ``dht``
    is a DhtClient's node, handed over."""
    from swarmloco.node.swarm import Swarm
    from swarmloco.protocol.transport import route_hivemind_logs

    route_hivemind_logs()
    stop = threading.Event()
    if cfg.access.private and not cfg.access.owner:
        print("swarmloco: access.private needs access.owner, the key that signs tokens (swarmloco init-run sets it)",
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        cfg = prepare_config(cfg)  # before anything starts: a bad model or data source is one line
        swarm = Swarm(cfg.run_id, config=cfg.swarm, identity=identity, stop=stop)
    except ValueError as e:
        print(f"swarmloco: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        swarm.start(dht=dht)
    except Exception as e:  # noqa: BLE001 - cannot reach the swarm or bind: one line, non-zero exit
        print(f"swarmloco: could not start the swarm node: {e}", file=sys.stderr)
        return EXIT_ERROR
    status_server = monitor = None
    try:
        board = StatusBoard(reporter=JsonLinesReporter() if json_events else NullReporter())
        try:
            peer = Peer(cfg, swarm, options, board=board)
        except ValueError as e:  # config that only shows up once the model and data exist
            print(f"swarmloco: {e}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
        except Exception as e:  # noqa: BLE001 - the averager could not start
            print(f"swarmloco: could not start the swarm node: {e}", file=sys.stderr, flush=True)
            return EXIT_ERROR
        install_stop_handlers(stop)
        maddrs = swarm.visible_maddrs()
        manifest = peer.diloco.manifest
        print(f"swarmloco: peer {swarm.peer_id} of run '{manifest.run_id}' (manifest {manifest.short})",
              file=sys.stderr, flush=True)
        for m in maddrs:
            print(f"swarmloco: listening on {m}", file=sys.stderr, flush=True)
        if maddrs and not cfg.swarm.initial_peers:
            print(f"swarmloco: others join with: --initial-peers {maddrs[0]}", file=sys.stderr, flush=True)
        if maddrs_file:
            write_maddrs(maddrs_file, maddrs)
        if (cfg.status.port or tui) and status_server_factory is not None:
            status_server = status_server_factory(board.snapshot, cfg.status.port)
            print(f"swarmloco: status on http://127.0.0.1:{status_server.port}/status", file=sys.stderr, flush=True)
        if tui and status_server is not None:
            monitor = start_monitor(status_server.port, maddrs, manifest.run_id, stop)
        try:
            steps = peer.run()
        except (ManifestMismatch, AccessRefused) as e:
            print(f"swarmloco: refused: {e}", file=sys.stderr, flush=True)
            return EXIT_MANIFEST
        except FloatingPointError as e:  # the local model diverged: say so in one line, leave cleanly
            print(f"swarmloco: stopping: {e}", file=sys.stderr, flush=True)
            return EXIT_ERROR
        logger.info("stopped after %d outer steps (now at outer step %d)", steps, peer.outer_step)
        return EXIT_OK
    finally:
        stop_monitor(monitor)
        if status_server is not None:
            status_server.close()
        swarm.close()
