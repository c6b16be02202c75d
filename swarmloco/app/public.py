"""``swarmloco keygen | join | init-run | token``: identities, owned runs and private swarms (docs/public-swarms.md)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from swarmloco.app.console import one_line, say
from swarmloco.protocol.bootstrap import Stopped
from swarmloco.app.flags import Refusal, check_peer_flags, load, peer_overrides, start_peer, swarm_overrides


def cmd_join(args: argparse.Namespace) -> int:
    """Join an owned run with no config file: the manifest comes from the DHT, signed by the owner."""
    from swarmloco.maddrs import maddr_problem
    from swarmloco.app import joining
    from swarmloco.app.launcher import start_dht_node
    from swarmloco.protocol.identity import load_identity
    from swarmloco.app.stopping import install_stop_handlers
    from swarmloco.protocol.transport import route_hivemind_logs

    if why := maddr_problem(args.maddr, dial=True):
        raise Refusal(f"MADDR {args.maddr}: {why}")
    if not (math.isfinite(args.manifest_timeout) and args.manifest_timeout > 0):
        raise Refusal(f"--manifest-timeout {args.manifest_timeout}: must be > 0 seconds")
    args.initial_peers = [args.maddr, *(args.initial_peers or [])]
    local = load(None, peer_overrides(args))
    try:
        spec = joining.RunSpec.parse(args.run) if args.run else None
    except joining.JoinError as e:
        raise Refusal(f"RUN {args.run}: {e}", e.exit_code) from None
    check_peer_flags(args)  # before the DHT node: a bad flag must not wait for a manifest first
    try:
        identity = load_identity(local.swarm.identity_path)
    except ValueError as e:
        raise Refusal(str(e)) from None
    install_stop_handlers(args.stop)
    route_hivemind_logs()
    validators = [joining.join_validator(spec)] if spec else []
    try:
        client = start_dht_node(local.swarm, identity, validators, stop=args.stop)
    except Stopped:
        return 0
    except Exception as e:  # noqa: BLE001
        raise Refusal(f"could not join the swarm's DHT: {one_line(e)}", 1) from None
    try:
        spec = joining.find_run(client.get, spec)
        signed = joining.fetch_manifest(client.get, spec, timeout=args.manifest_timeout, stop=args.stop)
        cfg = joining.config_from_manifest(signed, local, trust_data_path=args.trust_data_path)
    except joining.JoinError as e:
        client.shutdown()
        if args.stop.is_set():  # a signal while looking for the run: a clean stop
            return 0
        raise Refusal(str(e), e.exit_code) from None
    except BaseException:
        client.shutdown()
        raise
    if args.stop.is_set():
        client.shutdown()
        return 0
    say(f"swarmloco: joining run '{spec.run_id}' of owner {signed.author.hex()} (manifest "
        f"{signed.manifest.short}, signature checked)")
    return start_peer(cfg, args, identity=identity, dht=client.detach_dht())


def cmd_init_run(args: argparse.Namespace) -> int:
    """Sign and publish a run's manifest; keep a DHT node up that serves it (and bootstraps the swarm)."""
    from swarmloco.app import joining, preflight
    from swarmloco.app.launcher import start_dht_node, write_maddrs
    from swarmloco.app.stopping import NODE_STOP, install_stop_handlers
    from swarmloco.protocol.identity import Identity
    from swarmloco.protocol.transport import route_hivemind_logs

    overrides = {**swarm_overrides(args), "swarm.identity_path": None}
    if not args.initial_peers:
        overrides["swarm.host_maddrs"] = args.host_maddrs or ["/ip4/0.0.0.0/tcp/31337"]
    cfg = load(args.config, overrides)
    if not args.identity:
        raise Refusal("init-run needs --identity OWNER_KEY (make one with: swarmloco keygen PATH)")
    if not (math.isfinite(args.valid_days) and args.valid_days > 0):
        raise Refusal(f"--valid-days {args.valid_days}: must be a number of days > 0")
    if args.once and not args.initial_peers:
        raise Refusal("--once needs --initial-peers MADDR (a swarm to publish into)")
    try:
        owner = Identity.load(args.identity)
        cfg = joining.owned_config(cfg, owner)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise Refusal(f"--identity {args.identity}: {reason} (make a key with: swarmloco keygen PATH)") from None
    except joining.JoinError as e:
        raise Refusal(str(e), e.exit_code) from None
    from swarmloco.app.peer import prepare_config, run_manifest

    try:
        cfg = prepare_config(cfg)  # the owner pins the tokenizer's and pretrained weights' hashes
        preflight.check_codec(cfg)
        preflight.check_listen_maddrs(cfg.swarm.host_maddrs)
    except preflight.Refused as e:
        raise Refusal(str(e), e.exit_code) from None
    except ValueError as e:
        raise Refusal(str(e)) from None
    manifest = run_manifest(cfg)
    valid_s = args.valid_days * 86400.0
    install_stop_handlers(args.stop, NODE_STOP)
    route_hivemind_logs()
    try:  # the node runs with the owner's key: a stable peer id, so a stable address to publish
        client = start_dht_node(cfg.swarm, owner, [manifest.validator()], stop=args.stop)
    except Stopped:
        return 0
    except Exception as e:  # noqa: BLE001
        raise Refusal(f"could not start the DHT node: {one_line(e)}", 1) from None
    try:
        if args.stop.is_set():
            return 0
        joining.publish_owned_run(client, manifest, owner, valid_s)
        say(f"swarmloco: run '{manifest.run_id}' (manifest {manifest.short}) signed by {owner.public_hex}, "
            f"valid {args.valid_days:g} days{' (private: peers need tokens)' if cfg.access.private else ''}")
        for m in client.visible_maddrs():
            say(f"swarmloco: join with: swarmloco join {m} {manifest.run_id}@{owner.public_hex}")
        if args.maddrs_file:
            write_maddrs(args.maddrs_file, client.visible_maddrs())
        if not args.once:
            joining.serve_owned_run(client, manifest, owner, valid_s, args.stop)
    finally:
        client.shutdown()
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """The owner of a private run lets one peer key in: a signed token, published in the DHT."""
    from swarmloco.app.joining import JoinError, RunSpec
    from swarmloco.app.stopping import NODE_STOP, install_stop_handlers
    from swarmloco.protocol.access import issue_token, token_subkey
    from swarmloco.protocol.identity import Identity, public_key_of_peer_id
    from swarmloco.protocol.manifest import tokens_key
    from swarmloco.protocol.transport import DhtClient, route_hivemind_logs

    try:
        owner = Identity.load(args.owner_key)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise Refusal(f"OWNER_KEY {args.owner_key}: {reason}") from None
    try:
        RunSpec.parse(args.run)
    except JoinError as e:
        raise Refusal(f"RUN {args.run}: {e}") from None
    peer = public_key_of_peer_id(args.peer) if args.peer.startswith("12D3KooW") else None
    if peer is None:
        try:
            peer = bytes.fromhex(args.peer)
        except ValueError:
            peer = b""
    if len(peer) != 32:
        raise Refusal(f"PEER {args.peer}: give a peer's public key (64 hex chars) or its 12D3KooW... peer id")
    if not (math.isfinite(args.valid_days) and args.valid_days > 0):
        raise Refusal(f"--valid-days {args.valid_days}: must be a number of days > 0")
    expires = time.time() + args.valid_days * 86400.0
    try:
        token = issue_token(owner, peer, args.run, expires)
    except ValueError as e:
        raise Refusal(f"RUN {args.run}: {e}") from None
    if not args.initial_peers:
        raise Refusal("token needs --initial-peers MADDR of the swarm to publish the token in")
    cfg = load(None, {**swarm_overrides(args), "swarm.client_mode": True, "swarm.identity_path": None})
    install_stop_handlers(args.stop, NODE_STOP)
    route_hivemind_logs()
    try:
        client = DhtClient(cfg.swarm, stop=args.stop)
    except Stopped:
        return 0
    except Exception as e:  # noqa: BLE001
        raise Refusal(f"could not join the swarm's DHT: {one_line(e)}", 1) from None
    try:
        ok = client.store(tokens_key(args.run), token_subkey(owner.public_bytes, peer), token, expires)
    finally:
        client.shutdown()
    if not ok:
        raise Refusal("the DHT did not store the token", 1)
    say(f"swarmloco: token for {peer.hex()} in run '{args.run}' published, valid {args.valid_days:g} days")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """A persistent Ed25519 libp2p identity: an owner's key, or a peer's stable peer id."""
    from swarmloco.protocol.identity import Identity

    path = Path(args.path)
    if path.is_dir():
        raise Refusal(f"{args.path}: is a directory; give a file name for the key")
    if path.exists() and not args.force:
        raise Refusal(f"{args.path} exists (use --force to overwrite)")
    if not path.parent.is_dir():
        raise Refusal(f"{args.path}: the folder {path.parent} does not exist")
    identity = Identity.generate()
    try:
        identity.write_libp2p_key(args.path)
    except OSError as e:
        raise Refusal(f"{args.path}: cannot write it ({e.strerror or e})") from None
    print(f"peer id {identity.libp2p_peer_id()}\npublic key {identity.public_hex}\nwritten to {args.path} (mode 0600)")
    return 0
