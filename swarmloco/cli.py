"""Command line: ``swarmloco demo | run | join | init-run | token | monitor | keygen | bootstrap``.

The CLI picks a config file (or preset) and a few overrides; everything else lives in the TOML.
Logging is configured here and only here.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from swarmloco import __version__
from swarmloco.config import load_config

log = logging.getLogger("swarmloco")


def _setup_logging(verbose: int, log_file: str | None = None) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if log_file:
        logging.basicConfig(level=level, format=fmt, filename=log_file)
    else:
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    logging.getLogger("hivemind").setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


def _load(path: str | None, overrides: dict[str, Any]) -> Any:
    try:
        return load_config(path, {k: v for k, v in overrides.items() if v is not None})
    except ValueError as e:
        print(f"swarmloco: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _swarm_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "swarm.initial_peers": args.initial_peers or None,
        "swarm.host_maddrs": args.host_maddrs or None,
        "swarm.announce_maddrs": args.announce_maddrs or None,
        "swarm.client_mode": True if args.client_mode else None,
        "swarm.use_auto_relay": True if args.auto_relay else None,
        "swarm.identity_path": args.identity,
    }


def _add_swarm_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network (libp2p)")
    g.add_argument("--initial-peers", action="append", metavar="MADDR",
                   help="multiaddr of a live peer to join through (repeatable)")
    g.add_argument("--host-maddrs", action="append", metavar="MADDR",
                   help="listen multiaddr, e.g. /ip4/0.0.0.0/tcp/31337 or /ip4/0.0.0.0/udp/31337/quic (repeatable)")
    g.add_argument("--announce-maddrs", action="append", metavar="MADDR",
                   help="public multiaddr to announce (port forwarding)")
    g.add_argument("--client-mode", action="store_true",
                   help="behind NAT without port forwarding: outgoing connections only")
    g.add_argument("--auto-relay", action="store_true", help="find and use libp2p relays automatically")
    g.add_argument("--identity", metavar="PATH", help="persistent libp2p identity key file (keeps the peer id)")


def _peer_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {**_swarm_overrides(args), "checkpoint.dir": args.checkpoint_dir, "status.port": args.status_port,
            "swarm.min_peers": args.min_peers}


def _start_peer(cfg: Any, args: argparse.Namespace, **kwargs: Any) -> int:
    from swarmloco.node.launcher import run_peer
    from swarmloco.node.peer import PeerOptions

    options = PeerOptions(shard=args.shard, device=args.device, max_outer_steps=args.max_outer_steps,
                          resume=args.resume, inner_steps=args.inner_steps)
    if args.shard is not None and not 0 <= args.shard < cfg.data.num_shards:
        print(f"swarmloco: --shard {args.shard} is out of range [0, {cfg.data.num_shards})", file=sys.stderr)
        return 2
    return run_peer(cfg, options, json_events=args.json_events, maddrs_file=args.maddrs_file,
                    status_server_factory=_status_server_factory(), tui=args.tui, **kwargs)


def cmd_run(args: argparse.Namespace) -> int:
    return _start_peer(_load(args.config, _peer_overrides(args)), args)


def _status_server_factory():
    try:
        from swarmloco.node.status_server import StatusServer
    except ImportError:
        return None

    def make(get_status, port):
        server = StatusServer(get_status, port)
        server.start()
        return server

    return make


def cmd_demo(args: argparse.Namespace) -> int:
    from swarmloco.node.demo import run_demo

    cfg = _load(args.config, {"run_id": args.run_id})
    if args.peers < 1 or args.outer_steps < 1 or (args.inner_steps is not None and args.inner_steps < 1):
        print("swarmloco: --peers, --outer-steps and --inner-steps must be >= 1", file=sys.stderr)
        return 2
    return run_demo(cfg, peers=args.peers, outer_steps=args.outer_steps, inner_steps=args.inner_steps,
                    workdir=args.workdir, tui=args.tui)


def cmd_monitor(args: argparse.Namespace) -> int:
    from swarmloco.tui import MonitorApp, NodeSource, RecordedSource

    node = swarm = None
    dht = None
    if args.replay:
        node = RecordedSource.from_file(args.replay, key="status", loop=True)
        swarm = RecordedSource.from_file(args.replay, key="peers", loop=True, clock=time.time)
    if args.node is not None:
        node = NodeSource(_port_of(args.node))
    if args.initial_peers:
        from swarmloco.protocol.progress import SwarmWatcher
        from swarmloco.protocol.transport import DhtClient, route_hivemind_logs

        route_hivemind_logs()
        cfg = _load(None, {**_swarm_overrides(args), "swarm.client_mode": True,
                           "swarm.host_maddrs": args.host_maddrs or ["/ip4/0.0.0.0/tcp/0"]})
        try:
            dht = DhtClient(cfg.swarm)
        except Exception as e:  # noqa: BLE001
            print(f"swarmloco: could not join the swarm's DHT: {e}", file=sys.stderr)
            return 1
        swarm = SwarmWatcher(dht, args.run, ttl=cfg.swarm.heartbeat_ttl)
    if node is None and swarm is None:
        print("swarmloco: monitor needs --node PORT, --initial-peers MADDR or --replay FILE", file=sys.stderr)
        return 2
    try:
        MonitorApp(node, swarm).run()
    finally:
        if dht is not None:
            dht.shutdown()
    return 0


def _port_of(value: str) -> int:
    """--node takes a port or a URL like http://127.0.0.1:8000/status."""
    text = value.rsplit(":", 1)[-1].split("/")[0] if ":" in value else value
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise SystemExit(f"swarmloco: --node {value!r}: give a port or http://127.0.0.1:PORT")
    return int(text)


def cmd_keygen(args: argparse.Namespace) -> int:
    from swarmloco.protocol.identity import Identity

    if Path(args.path).exists() and not args.force:
        print(f"swarmloco: {args.path} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    identity = Identity.generate()
    identity.write_libp2p_key(args.path)
    print(f"peer id {identity.libp2p_peer_id()}\npublic key {identity.public_hex}\nwritten to {args.path} (mode 0600)")
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    """A DHT-only peer with a stable address: no model, no GPU. With ``--run``, it validates those runs'
    records like their peers do (a node without validators stores anything)."""
    from swarmloco.node import joining
    from swarmloco.node.launcher import install_stop_handlers, load_identity, start_dht_node, write_maddrs
    from swarmloco.protocol.transport import route_hivemind_logs

    route_hivemind_logs()
    overrides = _swarm_overrides(args)
    overrides["swarm.host_maddrs"] = args.host_maddrs or ["/ip4/0.0.0.0/tcp/31337"]
    cfg = _load(None, overrides)
    try:
        specs = [joining.RunSpec.parse(r) for r in args.run or []]
        identity = load_identity(cfg.swarm.identity_path)
    except (joining.JoinError, ValueError) as e:
        print(f"swarmloco: {e}", file=sys.stderr)
        return 2
    try:
        dht = start_dht_node(cfg.swarm, identity, [joining.join_validator(s) for s in specs])
    except Exception as e:  # noqa: BLE001
        print(f"swarmloco: could not start the bootstrap peer: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    install_stop_handlers(stop)
    try:
        for m in dht.visible_maddrs():
            print(f"swarmloco: bootstrap peer listening on {m}", file=sys.stderr, flush=True)
        print("swarmloco: peers join with --initial-peers <one of the addresses above>", file=sys.stderr, flush=True)
        if args.maddrs_file:
            write_maddrs(args.maddrs_file, dht.visible_maddrs())
        if specs:
            joining.guard_runs(dht, specs, stop)
        else:
            stop.wait()
    finally:
        dht.shutdown()
    return 0


def _add_peer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", type=int, default=None, help="data shard of this peer (default: from the peer id)")
    p.add_argument("--checkpoint-dir", default=None, help="write checkpoints here (overrides checkpoint.dir)")
    p.add_argument("--max-outer-steps", type=int, default=None, help="exit 0 after this many outer steps")
    p.add_argument("--inner-steps", type=int, default=None, help="override inner.steps locally (H)")
    p.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in checkpoint.dir")
    p.add_argument("--min-peers", type=int, default=None, help="wait for this many peers before the first round")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--status-port", type=int, default=None, help="serve status on 127.0.0.1:PORT (0: off)")
    p.add_argument("--json-events", action="store_true", help="print machine-readable round lines on stdout")
    p.add_argument("--tui", action="store_true", help="show this node in the terminal monitor (logs: --log-file)")
    p.add_argument("--log-file", default=None, help="write logs here instead of stderr (default with --tui: swarmloco.log)")
    p.add_argument("--maddrs-file", default=None, help=argparse.SUPPRESS)
    _add_swarm_flags(p)


def build_parser() -> argparse.ArgumentParser:
    from swarmloco.cli_public import cmd_init_run, cmd_join, cmd_token

    parser = argparse.ArgumentParser(prog="swarmloco", description="DiLoCo training over a volunteer swarm")
    parser.add_argument("--version", action="version", version=f"swarmloco {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logs (-vv: debug, hivemind too)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run a local swarm of N peer processes on loopback")
    p.add_argument("--peers", type=int, default=4, help="number of peer processes (default 4)")
    p.add_argument("--outer-steps", type=int, default=10, help="outer steps to run (default 10)")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps per outer step (default: config's)")
    p.add_argument("--config", default=None, help="TOML config (default: built-in defaults)")
    p.add_argument("--run-id", default="demo", help="run name (default demo)")
    p.add_argument("--workdir", default=None, help="keep peers' configs and logs here")
    p.add_argument("--tui", action="store_true", help="watch the local swarm in the terminal monitor")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="start one peer from a config file")
    p.add_argument("config", help="TOML config file")
    _add_peer_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("join", help="join an owned run: the manifest comes from the DHT, signed by its owner")
    p.add_argument("maddr", metavar="MADDR", help="multiaddr of any peer of the swarm (or its bootstrap peer)")
    p.add_argument("run", metavar="RUN[@OWNER]", nargs="?", default=None,
                   help="run name, optionally pinned to the owner's public key (default: the swarm's only run)")
    p.add_argument("--trust-data-path", action="store_true",
                   help="allow a manifest that reads training data from a local path")
    p.add_argument("--manifest-timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    _add_peer_flags(p)
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("init-run", help="sign and publish a run's manifest as its owner; serve it")
    p.add_argument("config", help="TOML config file of the run")
    p.add_argument("--valid-days", type=float, default=30.0, help="the signed manifest's lifetime (default 30)")
    p.add_argument("--once", action="store_true", help="publish through --initial-peers and exit")
    p.add_argument("--maddrs-file", default=None, help=argparse.SUPPRESS)
    _add_swarm_flags(p)
    p.set_defaults(func=cmd_init_run)

    p = sub.add_parser("token", help="as a private run's owner, let a peer's key in")
    p.add_argument("owner_key", metavar="OWNER_KEY", help="the owner's identity file")
    p.add_argument("run", metavar="RUN", help="run name")
    p.add_argument("peer", metavar="PEER", help="the peer's public key (hex) or peer id")
    p.add_argument("--valid-days", type=float, default=30.0, help="token lifetime (default 30)")
    _add_swarm_flags(p)
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("monitor", help="terminal UI of a node and of the swarm")
    p.add_argument("--node", default=None, metavar="PORT|URL", help="a node's status endpoint on 127.0.0.1")
    p.add_argument("--run", default="demo", help="run id whose peers to list (default demo)")
    p.add_argument("--replay", default=None, metavar="FILE", help="replay a recorded status stream (JSON/JSONL)")
    _add_swarm_flags(p)
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("keygen", help="make a persistent Ed25519 libp2p identity")
    p.add_argument("path", help="key file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("bootstrap", help="run a DHT-only peer with a stable address for others to join through")
    p.add_argument("--run", action="append", metavar="RUN[@OWNER]",
                   help="validate this run's records like its peers do (repeatable; @OWNER: also its heartbeats)")
    p.add_argument("--maddrs-file", default=None, help=argparse.SUPPRESS)
    _add_swarm_flags(p)
    p.set_defaults(func=cmd_bootstrap)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_file = getattr(args, "log_file", None) or ("swarmloco.log" if getattr(args, "tui", False)
                                                  and args.command == "run" else None)
    _setup_logging(args.verbose, log_file)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
