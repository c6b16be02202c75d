"""Flags and config loading shared by the peer commands (``run``, ``join``) and the DHT-only ones.

Every bad input is a :class:`Refusal`: one line naming the flag or field as the user wrote it, and an
exit code from :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from swarmloco.app.console import say
from swarmloco.config import ConfigError, load_config, show_value

EXIT_CODES = """\
exit codes:
  0  done, or stopped by Ctrl-C / SIGTERM / SIGHUP (once: it stops cleanly)
  1  could not start (a port is taken, the initial peers are unreachable)
  2  bad flags, config or data (one line names the flag or field)
  3  refused by the swarm (another manifest, no access token, no owner-signed manifest)
  130  a second signal: exit at once"""

# config fields a flag sets: an error in the value names the flag, as the user typed it
FLAG_OF_FIELD = {
    "swarm.initial_peers": "--initial-peers", "swarm.host_maddrs": "--host-maddrs",
    "swarm.announce_maddrs": "--announce-maddrs", "swarm.identity_path": "--identity",
    "checkpoint.dir": "--checkpoint-dir", "status.port": "--status-port", "swarm.min_peers": "--min-peers",
    "run_id": "--run-id",
}


class Refusal(Exception):
    """A bad input found by the CLI itself: one line, an exit code."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def load(path: str | None, overrides: dict[str, Any]) -> Any:
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return load_config(path, given)
    except ConfigError as e:
        flag = FLAG_OF_FIELD.get(e.field)
        if flag and e.field in given:
            value = e.value if isinstance(e.value, (str, int)) and not isinstance(e.value, bool) else show_value(e.value)
            raise Refusal(f"{flag} {value}: {e.why}") from None
        raise Refusal(str(e)) from None
    except ValueError as e:
        raise Refusal(str(e)) from None


def swarm_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "swarm.initial_peers": args.initial_peers or None,
        "swarm.host_maddrs": args.host_maddrs or None,
        "swarm.announce_maddrs": args.announce_maddrs or None,
        "swarm.client_mode": True if args.client_mode else None,
        "swarm.use_auto_relay": True if args.auto_relay else None,
        "swarm.identity_path": args.identity,
    }


def add_swarm_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network (libp2p)")
    g.add_argument("--initial-peers", action="append", metavar="MADDR",
                   help="multiaddr of a live peer to join through, ending in /p2p/<peer id> (repeatable)")
    g.add_argument("--host-maddrs", action="append", metavar="MADDR",
                   help="listen multiaddr, e.g. /ip4/0.0.0.0/tcp/31337 or /ip4/0.0.0.0/udp/31337/quic (repeatable)")
    g.add_argument("--announce-maddrs", action="append", metavar="MADDR",
                   help="public multiaddr to announce (port forwarding)")
    g.add_argument("--client-mode", action="store_true",
                   help="behind NAT without port forwarding: outgoing connections only")
    g.add_argument("--auto-relay", action="store_true", help="find and use libp2p relays automatically")
    g.add_argument("--identity", metavar="PATH", help="persistent libp2p identity key file (keeps the peer id)")


def peer_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {**swarm_overrides(args), "checkpoint.dir": args.checkpoint_dir, "status.port": args.status_port,
            "swarm.min_peers": args.min_peers}


def check_peer_flags(args: argparse.Namespace, cfg: Any = None, *, listening: bool = True) -> None:
    """The flags of ``run`` / ``join`` that can be checked before anything starts (Refusal if bad).
    ``cfg``: the run's config if known (``join`` knows it only once the manifest is fetched)."""
    from swarmloco.app import preflight

    try:
        if args.inner_steps is not None and args.inner_steps < 1:
            raise preflight.Refused(f"--inner-steps {args.inner_steps}: must be >= 1 (inner steps per outer step)")
        if args.max_outer_steps is not None and args.max_outer_steps < 1:
            raise preflight.Refused(f"--max-outer-steps {args.max_outer_steps}: must be >= 1")
        if args.shard is not None and args.shard < 0:
            raise preflight.Refused(f"--shard {args.shard}: must be >= 0")
        if cfg is not None:
            preflight.check_peer_options(cfg, shard=args.shard, inner_steps=args.inner_steps,
                                         max_outer_steps=args.max_outer_steps, resume=args.resume)
        preflight.check_device(args.device)
        if args.identity:
            preflight.check_key_path(args.identity, "--identity")
        if args.checkpoint_dir:
            preflight.check_writable_dir(args.checkpoint_dir, "--checkpoint-dir")
        if args.status_port:
            if not 0 < args.status_port < 65536:
                raise preflight.Refused(f"--status-port {args.status_port}: must be from 0 (off) to 65535")
            preflight.check_port_free(args.status_port, "--status-port")
        if listening and args.host_maddrs:
            preflight.check_listen_maddrs(args.host_maddrs, "--host-maddrs")
    except preflight.Refused as e:
        raise Refusal(str(e), e.exit_code) from None


def start_peer(cfg: Any, args: argparse.Namespace, **kwargs: Any) -> int:
    from swarmloco.app.launcher import run_peer
    from swarmloco.app.peer import PeerOptions

    try:
        check_peer_flags(args, cfg, listening=kwargs.get("dht") is None)
    except Refusal:
        if kwargs.get("dht") is not None:  # (join: its DHT node is already up)
            from swarmloco.protocol.transport import shutdown_dht

            shutdown_dht(kwargs["dht"])
        raise
    options = PeerOptions(shard=args.shard, device=args.device, max_outer_steps=args.max_outer_steps,
                          resume=args.resume, inner_steps=args.inner_steps)
    out = _to_log if args.tui else say
    return run_peer(cfg, options, json_events=args.json_events, maddrs_file=args.maddrs_file,
                    status_server_factory=_status_server_factory(), tui=args.tui, stop=args.stop, out=out, **kwargs)


def _to_log(line: str) -> None:
    """Under ``--tui`` the monitor owns the terminal: the peer's lines go to the log file."""
    logging.getLogger("swarmloco.console").info(line)


def add_peer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", type=int, default=None, help="data shard of this peer (default: from the peer id)")
    p.add_argument("--checkpoint-dir", default=None, help="write checkpoints here (overrides checkpoint.dir)")
    p.add_argument("--max-outer-steps", type=int, default=None, help="exit 0 after this many outer steps")
    p.add_argument("--inner-steps", type=int, default=None, help="override inner.steps locally (H, >= 1)")
    p.add_argument("--resume", action="store_true",
                   help="resume from this run's newest checkpoint in the checkpoint directory (needs one)")
    p.add_argument("--min-peers", type=int, default=None, help="wait for this many peers before the first round")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--status-port", type=int, default=None, help="serve status on 127.0.0.1:PORT (0: off)")
    p.add_argument("--json-events", action="store_true", help="print machine-readable round lines on stdout")
    p.add_argument("--tui", action="store_true", help="show this node in the terminal monitor (logs: --log-file)")
    p.add_argument("--log-file", default=None, help="write logs here instead of stderr (default with --tui: swarmloco.log)")
    p.add_argument("--maddrs-file", default=None, help=argparse.SUPPRESS)
    add_swarm_flags(p)


def _status_server_factory():
    try:
        from swarmloco.app.status_server import StatusServer
    except ImportError:
        return None

    def make(get_status, port):
        server = StatusServer(get_status, port)
        server.start()
        return server

    return make
