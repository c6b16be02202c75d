"""Command line: ``swarmloco demo | run | join | init-run | token | monitor | keygen | bootstrap``.

The CLI picks a config file (or preset) and a few overrides; everything else lives in the TOML.
Logging is configured here and only here.

Every bad input is refused before anything starts, in one line naming the flag or field as the user
wrote it, with the exit codes of :data:`EXIT_CODES`; no input produces a traceback (``-v`` shows one
for an unexpected error).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import traceback
from pathlib import Path

from swarmloco import __version__
from swarmloco.app.console import one_line, say
from swarmloco.protocol.bootstrap import Stopped
from swarmloco.app.flags import (EXIT_CODES, Refusal, add_peer_flags, add_swarm_flags, check_peer_flags, load,
                                 peer_overrides, start_peer, swarm_overrides)

log = logging.getLogger("swarmloco")

class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is one ``--help`` away)."""

    def error(self, message: str):  # type: ignore[override]
        say(f"{self.prog}: {message} (see: {self.prog} --help)")
        raise SystemExit(2)


def _setup_logging(verbose: int, log_file: str | None, stop: threading.Event) -> None:
    """Console: warnings and errors (``-v``: info, ``-vv``: debug, hivemind's too); a ``--log-file``
    gets info. After a stop signal the console stays quiet (see ``stopping.QuietAfterStop``)."""
    from swarmloco.app.stopping import OneLineFormatter, QuietAfterStop

    level = logging.DEBUG if verbose > 1 else logging.INFO if (verbose or log_file) else logging.WARNING
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt) if verbose or log_file else OneLineFormatter(fmt))
    if not verbose and not log_file:
        handler.addFilter(QuietAfterStop(stop))
    handler._swarmloco = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_swarmloco", False)]:  # main() called again (tests)
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("hivemind").setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)
    threading.excepthook = _thread_died  # (inherited by hivemind's helper processes: forked after this)


def _thread_died(args) -> None:
    """A thread's uncaught exception is a log record (one line on the console), not a raw traceback."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("swarmloco").warning("thread %s died: %s: %s", name, args.exc_type.__name__, args.exc_value,
                                           exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load(args.config, peer_overrides(args))
    return start_peer(cfg, args)


def cmd_demo(args: argparse.Namespace) -> int:
    from swarmloco.app.demo import run_demo

    if args.peers < 1 or args.outer_steps < 1 or (args.inner_steps is not None and args.inner_steps < 1):
        bad = next(f"{flag} {v}" for flag, v in (("--peers", args.peers), ("--outer-steps", args.outer_steps),
                                                 ("--inner-steps", args.inner_steps)) if v is not None and v < 1)
        raise Refusal(f"{bad}: must be >= 1")
    cfg = load(args.config, {"run_id": args.run_id})
    if args.workdir and Path(args.workdir).exists() and not Path(args.workdir).is_dir():
        raise Refusal(f"--workdir {args.workdir}: exists and is not a directory")
    return run_demo(cfg, peers=args.peers, outer_steps=args.outer_steps, inner_steps=args.inner_steps,
                    workdir=args.workdir, tui=args.tui)


def cmd_monitor(args: argparse.Namespace) -> int:
    from swarmloco.app.stopping import NODE_STOP, install_stop_handlers
    from swarmloco.tui import MonitorApp, NodeSource

    node = swarm = None
    dht = None
    if args.node is None and not args.initial_peers and not args.replay:
        raise Refusal("monitor needs --node PORT, --initial-peers MADDR or --replay FILE")
    if args.replay:
        node, swarm = _recording(args.replay)
    if args.node is not None:
        node = NodeSource(_port_of(args.node))
    if args.initial_peers:
        from swarmloco.app.joining import JoinError, RunSpec
        from swarmloco.protocol.progress import SwarmWatcher
        from swarmloco.protocol.transport import DhtClient, route_hivemind_logs

        try:
            RunSpec.parse(args.run)
        except JoinError as e:
            raise Refusal(f"--run {args.run}: {e}") from None
        route_hivemind_logs()
        cfg = load(None, {**swarm_overrides(args), "swarm.client_mode": True,
                           "swarm.host_maddrs": args.host_maddrs or ["/ip4/0.0.0.0/tcp/0"]})
        install_stop_handlers(args.stop, NODE_STOP)  # while the DHT starts; the app takes over the signals
        try:
            dht = DhtClient(cfg.swarm, stop=args.stop)
            swarm = SwarmWatcher(dht, args.run, ttl=cfg.swarm.heartbeat_ttl)
        except Stopped:
            return 0
        except Exception as e:  # noqa: BLE001
            reason = f"could not join the swarm's DHT: {one_line(e)}"
            if node is None:
                raise Refusal(reason, 1) from None
            swarm = _NoSwarm(reason)  # the node view still works (a demo whose swarm already finished)
    try:
        if not args.stop.is_set():
            MonitorApp(node, swarm, attached=args.attached, handle_signals=True).run()
    finally:
        if dht is not None:
            install_stop_handlers(args.stop, NODE_STOP)  # (the app's own handlers are gone with its loop)
            args.stop.set()
            dht.shutdown()
    return 0


class _NoSwarm:
    """The swarm view's source when the DHT could not be joined: it says why, the node view goes on."""

    def __init__(self, reason: str):
        self.reason = reason

    def fetch(self) -> list[dict]:
        from swarmloco.tui import Unreachable

        raise Unreachable(self.reason)


def _recording(path: str):
    from swarmloco.tui import RecordedSource
    from swarmloco.tui.sources import load_recording

    try:
        frames = load_recording(path)
    except FileNotFoundError:
        raise Refusal(f"--replay {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise Refusal(f"--replay {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    except ValueError as e:
        raise Refusal(f"--replay {path}: not a JSON or JSON-lines recording ({one_line(e)})") from None
    if not frames:
        raise Refusal(f"--replay {path}: the recording holds no frames")
    return (RecordedSource(frames, key="status", loop=True),
            RecordedSource(frames, key="peers", loop=True, clock=time.time))


def _port_of(value: str) -> int:
    """--node takes a port or a URL like http://127.0.0.1:8000/status."""
    text = value.rsplit(":", 1)[-1].split("/")[0] if ":" in value else value
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise Refusal(f"--node {value}: give a port (1-65535) or http://127.0.0.1:PORT")
    return int(text)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    """A DHT-only peer with a stable address: no model, no GPU. With ``--run``, it validates those runs'
    records like their peers do (a node without validators stores anything)."""
    from swarmloco.app import joining, preflight
    from swarmloco.app.launcher import start_dht_node, write_maddrs
    from swarmloco.protocol.identity import load_identity
    from swarmloco.app.stopping import NODE_STOP, install_stop_handlers
    from swarmloco.protocol.transport import route_hivemind_logs

    install_stop_handlers(args.stop, NODE_STOP)
    route_hivemind_logs()
    overrides = swarm_overrides(args)
    overrides["swarm.host_maddrs"] = args.host_maddrs or ["/ip4/0.0.0.0/tcp/31337"]
    cfg = load(None, overrides)
    try:
        specs = [joining.RunSpec.parse(r) for r in args.run or []]
        if args.identity:
            preflight.check_key_path(args.identity)
        preflight.check_listen_maddrs(cfg.swarm.host_maddrs)
        identity = load_identity(cfg.swarm.identity_path)
    except joining.JoinError as e:
        raise Refusal(f"--run: {e}") from None
    except preflight.Refused as e:
        raise Refusal(str(e), e.exit_code) from None
    except ValueError as e:
        raise Refusal(str(e)) from None
    try:
        dht = start_dht_node(cfg.swarm, identity, [joining.join_validator(s) for s in specs], stop=args.stop)
    except Stopped:
        return 0
    except Exception as e:  # noqa: BLE001
        raise Refusal(f"could not start the bootstrap peer: {one_line(e)}", 1) from None
    try:
        for m in dht.visible_maddrs():
            say(f"swarmloco: bootstrap peer listening on {m}")
        say("swarmloco: peers join with --initial-peers <one of the addresses above>")
        if args.maddrs_file:
            write_maddrs(args.maddrs_file, dht.visible_maddrs())
        if specs:
            joining.guard_runs(dht, specs, args.stop)
        else:
            args.stop.wait()
    finally:
        dht.shutdown()
    return 0


def _sub(sub, name: str, help_text: str, epilog: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                          epilog=f"{epilog}\n\n{EXIT_CODES}", formatter_class=argparse.RawDescriptionHelpFormatter,
                          **kwargs)


PEER_STOP_NOTE = """stopping: Ctrl-C, SIGTERM or SIGHUP (also to the whole process group) once: the peer
  leaves the swarm, writes its checkpoint, stops hivemind's processes and exits 0 (within seconds;
  at most 60 s); a second signal exits at once."""


def build_parser() -> argparse.ArgumentParser:
    from swarmloco.app.public import cmd_init_run, cmd_join, cmd_keygen, cmd_token

    parser = _Parser(
        prog="swarmloco", description="DiLoCo training over a volunteer swarm.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""examples:
  swarmloco demo                                   a local 4-peer swarm; one line per outer step
  swarmloco run configs/small.toml                 start a swarm; prints the address others join through
  swarmloco run configs/small.toml --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...
  swarmloco join /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...   join an owned run, no config file
  swarmloco monitor --node 8000                    watch a node started with --status-port 8000

'swarmloco COMMAND --help' shows each command's flags, which are required, and an example.

{EXIT_CODES}""")
    parser.add_argument("--version", action="version", version=f"swarmloco {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logs (-vv: debug, hivemind too)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _sub(sub, "demo", "run a local swarm of N peer processes on loopback", """required: nothing.
example:
  swarmloco demo --peers 4 --outer-steps 10      prints one line per outer step
  swarmloco demo --tui                           the same, watched in the monitor (q stops the demo)

stopping: Ctrl-C, SIGTERM or SIGHUP once stops every peer cleanly (exit 0); a second signal exits at once.""")
    p.add_argument("--peers", type=int, default=4, help="number of peer processes (default 4)")
    p.add_argument("--outer-steps", type=int, default=10, help="outer steps to run (default 10)")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps per outer step (default: config's)")
    p.add_argument("--config", default=None, help="TOML config (default: built-in defaults)")
    p.add_argument("--run-id", default="demo", help="run name (default demo)")
    p.add_argument("--workdir", default=None, help="keep peers' configs and logs here")
    p.add_argument("--tui", action="store_true", help="watch the local swarm in the terminal monitor")
    p.set_defaults(func=cmd_demo)

    p = _sub(sub, "run", "start one peer from a config file", f"""required: CONFIG (a TOML file); --initial-peers to join a swarm (none: start a new one).
examples:
  swarmloco run configs/small.toml --checkpoint-dir ckpt/
  swarmloco run configs/small.toml --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...
  swarmloco run configs/small.toml --resume --checkpoint-dir ckpt/ --status-port 8000

It prints one line per outer step (loss, peers, bytes, round time) and a warning when this peer's
work was dropped.

{PEER_STOP_NOTE}""")
    p.add_argument("config", help="TOML config file")
    add_peer_flags(p)
    p.set_defaults(func=cmd_run)

    p = _sub(sub, "join", "join an owned run: the manifest comes from the DHT, signed by its owner",
             f"""required: MADDR (any peer of the swarm, or its bootstrap peer, ending in /p2p/<peer id>).
examples:
  swarmloco join /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...                    the swarm's only run
  swarmloco join /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... small@9f2c...e41a   pinned to its owner

Takes every flag of 'run' except the config file.

{PEER_STOP_NOTE}""")
    p.add_argument("maddr", metavar="MADDR", help="multiaddr of any peer of the swarm (or its bootstrap peer)")
    p.add_argument("run", metavar="RUN[@OWNER]", nargs="?", default=None,
                   help="run name, optionally pinned to the owner's public key (default: the swarm's only run)")
    p.add_argument("--trust-data-path", action="store_true",
                   help="allow a manifest that reads training data from a local path")
    p.add_argument("--manifest-timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    add_peer_flags(p)
    p.set_defaults(func=cmd_join)

    p = _sub(sub, "init-run", "sign and publish a run's manifest as its owner; serve it",
             """required: CONFIG and --identity OWNER_KEY (make one with: swarmloco keygen owner.key);
  --once needs --initial-peers.
example:
  swarmloco init-run configs/small.toml --identity owner.key --host-maddrs /ip4/0.0.0.0/tcp/31337

stopping: Ctrl-C, SIGTERM or SIGHUP once: it leaves the swarm and exits 0; a second signal exits at once.""")
    p.add_argument("config", help="TOML config file of the run")
    p.add_argument("--valid-days", type=float, default=30.0, help="the signed manifest's lifetime (default 30)")
    p.add_argument("--once", action="store_true", help="publish through --initial-peers and exit")
    p.add_argument("--maddrs-file", default=None, help=argparse.SUPPRESS)
    add_swarm_flags(p)
    p.set_defaults(func=cmd_init_run)

    p = _sub(sub, "token", "as a private run's owner, let a peer's key in",
             """required: OWNER_KEY RUN PEER and --initial-peers MADDR (the swarm to publish the token in).
example:
  swarmloco token owner.key small 12D3KooW... --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...""")
    p.add_argument("owner_key", metavar="OWNER_KEY", help="the owner's identity file")
    p.add_argument("run", metavar="RUN", help="run name")
    p.add_argument("peer", metavar="PEER", help="the peer's public key (hex) or peer id")
    p.add_argument("--valid-days", type=float, default=30.0, help="token lifetime (default 30)")
    add_swarm_flags(p)
    p.set_defaults(func=cmd_token)

    p = _sub(sub, "monitor", "terminal UI of a node and of the swarm",
             """required: one of --node PORT, --initial-peers MADDR (with --run RUN) or --replay FILE.
examples:
  swarmloco monitor --node 8000                                   a node started with --status-port 8000
  swarmloco monitor --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... --run small
  swarmloco monitor --replay tests/fixtures/monitor_recording.jsonl

keys: tab switches view, ? help, q quits the monitor (a node it watches keeps training).
stopping: Ctrl-C (in its screen: q), SIGTERM or SIGHUP: it leaves the swarm's DHT and exits 0.""")
    p.add_argument("--node", default=None, metavar="PORT|URL", help="a node's status endpoint on 127.0.0.1")
    p.add_argument("--run", default="demo", help="run id whose peers to list (default demo)")
    p.add_argument("--replay", default=None, metavar="FILE", help="replay a recorded status stream (JSON/JSONL)")
    p.add_argument("--attached", choices=("node", "demo"), default=None, help=argparse.SUPPRESS)
    add_swarm_flags(p)
    p.set_defaults(func=cmd_monitor)

    p = _sub(sub, "keygen", "make a persistent Ed25519 libp2p identity", """required: PATH.
example:
  swarmloco keygen owner.key          prints the peer id and public key; use it with --identity owner.key""")
    p.add_argument("path", help="key file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_keygen)

    p = _sub(sub, "bootstrap", "run a DHT-only peer with a stable address for others to join through",
             """required: nothing (--identity keeps its address stable across restarts).
example:
  swarmloco bootstrap --identity boot.key --host-maddrs /ip4/0.0.0.0/tcp/31337 --run small@9f2c...e41a

stopping: Ctrl-C, SIGTERM or SIGHUP once: it leaves the swarm and exits 0; a second signal exits at once.""")
    p.add_argument("--run", action="append", metavar="RUN[@OWNER]",
                   help="validate this run's records like its peers do (repeatable; @OWNER: also its heartbeats)")
    p.add_argument("--maddrs-file", default=None, help=argparse.SUPPRESS)
    add_swarm_flags(p)
    p.set_defaults(func=cmd_bootstrap)
    return parser


def main(argv: list[str] | None = None) -> int:
    from swarmloco.app import preflight

    parser = build_parser()
    args = parser.parse_args(argv)
    args.stop = threading.Event()
    log_file = getattr(args, "log_file", None) or ("swarmloco.log" if getattr(args, "tui", False)
                                                  and args.command == "run" else None)
    try:
        preflight.check_log_file(log_file)
    except preflight.Refused as e:
        say(f"swarmloco: {e}")
        return 2
    _setup_logging(args.verbose, log_file, args.stop)
    try:
        return int(args.func(args) or 0)
    except Refusal as e:
        say(f"swarmloco: {e}")
        return e.exit_code
    except KeyboardInterrupt:  # a Ctrl-C before the command's own handlers were in place
        return 130
    except Exception as e:  # noqa: BLE001 - never a traceback for the user; -v shows it
        if args.verbose:
            traceback.print_exc()
        say(f"swarmloco: unexpected error: {type(e).__name__}: {one_line(e)}"
            + ("" if args.verbose else " (run with -v for the traceback)"))
        return 1


__all__ = ["EXIT_CODES", "Refusal", "build_parser", "check_peer_flags", "main"]


if __name__ == "__main__":
    sys.exit(main())
