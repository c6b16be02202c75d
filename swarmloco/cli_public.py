"""``swarmloco join | init-run | token``: owned runs and private swarms (see README "Public swarms")."""

from __future__ import annotations

import argparse
import sys
import threading
import time

from swarmloco.cli import _load, _peer_overrides, _start_peer, _swarm_overrides


def cmd_join(args: argparse.Namespace) -> int:
    """Join an owned run with no config file: the manifest comes from the DHT, signed by the owner."""
    from swarmloco.node import joining
    from swarmloco.node.launcher import EXIT_CONFIG, EXIT_ERROR, load_identity, start_dht_node
    from swarmloco.protocol.transport import route_hivemind_logs

    route_hivemind_logs()
    args.initial_peers = [args.maddr, *(args.initial_peers or [])]
    local = _load(None, _peer_overrides(args))
    try:
        spec = joining.RunSpec.parse(args.run) if args.run else None
        identity = load_identity(local.swarm.identity_path)
    except (joining.JoinError, ValueError) as e:
        print(f"swarmloco: {e}", file=sys.stderr)
        return EXIT_CONFIG
    validators = [joining.join_validator(spec)] if spec else []
    try:
        client = start_dht_node(local.swarm, identity, validators)
    except Exception as e:  # noqa: BLE001
        print(f"swarmloco: could not join the swarm's DHT: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        spec = joining.find_run(client.get, spec)
        signed = joining.fetch_manifest(client.get, spec, timeout=args.manifest_timeout)
        cfg = joining.config_from_manifest(signed, local, trust_data_path=args.trust_data_path)
    except joining.JoinError as e:
        client.shutdown()
        print(f"swarmloco: {e}", file=sys.stderr)
        return e.exit_code
    print(f"swarmloco: joining run '{spec.run_id}' of owner {signed.author.hex()} (manifest "
          f"{signed.manifest.short}, signature checked)", file=sys.stderr, flush=True)
    return _start_peer(cfg, args, identity=identity, dht=client.detach_dht())


def cmd_init_run(args: argparse.Namespace) -> int:
    """Sign and publish a run's manifest; keep a DHT node up that serves it (and bootstraps the swarm)."""
    from swarmloco.node import joining
    from swarmloco.node.launcher import install_stop_handlers, start_dht_node, write_maddrs
    from swarmloco.protocol.identity import Identity
    from swarmloco.protocol.transport import route_hivemind_logs

    route_hivemind_logs()
    overrides = {**_swarm_overrides(args), "swarm.identity_path": None}
    if not args.initial_peers:
        overrides["swarm.host_maddrs"] = args.host_maddrs or ["/ip4/0.0.0.0/tcp/31337"]
    cfg = _load(args.config, overrides)
    if not args.identity:
        print("swarmloco: init-run needs --identity OWNER_KEY (make one with: swarmloco keygen PATH)", file=sys.stderr)
        return 2
    if not args.valid_days > 0 or (args.once and not args.initial_peers):
        print("swarmloco: --valid-days must be > 0, and --once needs --initial-peers (a swarm to publish into)",
              file=sys.stderr)
        return 2
    try:
        owner = Identity.load(args.identity)
        cfg = joining.owned_config(cfg, owner)
    except (OSError, ValueError) as e:
        print(f"swarmloco: owner key {args.identity}: {e} (make one with: swarmloco keygen PATH)", file=sys.stderr)
        return 2
    except joining.JoinError as e:
        print(f"swarmloco: {e}", file=sys.stderr)
        return e.exit_code
    from swarmloco.node.peer import prepare_config, run_manifest

    try:
        cfg = prepare_config(cfg)  # the owner pins the tokenizer's and pretrained weights' hashes
    except ValueError as e:
        print(f"swarmloco: {e}", file=sys.stderr)
        return 2
    manifest = run_manifest(cfg)
    valid_s = args.valid_days * 86400.0
    try:  # the node runs with the owner's key: a stable peer id, so a stable address to publish
        client = start_dht_node(cfg.swarm, owner, [manifest.validator()])
    except Exception as e:  # noqa: BLE001
        print(f"swarmloco: could not start the DHT node: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    install_stop_handlers(stop)
    try:
        joining.publish_owned_run(client, manifest, owner, valid_s)
        print(f"swarmloco: run '{manifest.run_id}' (manifest {manifest.short}) signed by {owner.public_hex}, "
              f"valid {args.valid_days:g} days{' (private: peers need tokens)' if cfg.access.private else ''}",
              file=sys.stderr, flush=True)
        for m in client.visible_maddrs():
            print(f"swarmloco: join with: swarmloco join {m} {manifest.run_id}@{owner.public_hex}",
                  file=sys.stderr, flush=True)
        if args.maddrs_file:
            write_maddrs(args.maddrs_file, client.visible_maddrs())
        if not args.once:
            joining.serve_owned_run(client, manifest, owner, valid_s, stop)
    finally:
        client.shutdown()
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """The owner of a private run lets one peer key in: a signed token, published in the DHT."""
    from swarmloco.protocol.access import issue_token, token_subkey
    from swarmloco.protocol.identity import Identity, public_key_of_peer_id
    from swarmloco.protocol.manifest import tokens_key
    from swarmloco.protocol.transport import DhtClient, route_hivemind_logs

    try:
        owner = Identity.load(args.owner_key)
    except (OSError, ValueError) as e:
        print(f"swarmloco: owner key {args.owner_key}: {e}", file=sys.stderr)
        return 2
    peer = public_key_of_peer_id(args.peer) if args.peer.startswith("12D3KooW") else None
    if peer is None:
        try:
            peer = bytes.fromhex(args.peer)
        except ValueError:
            peer = b""
    if len(peer) != 32:
        print("swarmloco: PEER must be a peer's public key (64 hex chars) or its 12D3KooW... peer id", file=sys.stderr)
        return 2
    if not args.valid_days > 0:
        print("swarmloco: --valid-days must be > 0", file=sys.stderr)
        return 2
    expires = time.time() + args.valid_days * 86400.0
    try:
        token = issue_token(owner, peer, args.run, expires)
    except ValueError as e:
        print(f"swarmloco: {e}", file=sys.stderr)
        return 2
    if not args.initial_peers:
        print("swarmloco: token needs --initial-peers MADDR of the swarm to publish the token in", file=sys.stderr)
        return 2
    route_hivemind_logs()
    cfg = _load(None, {**_swarm_overrides(args), "swarm.client_mode": True, "swarm.identity_path": None})
    try:
        client = DhtClient(cfg.swarm)
    except Exception as e:  # noqa: BLE001
        print(f"swarmloco: could not join the swarm's DHT: {e}", file=sys.stderr)
        return 1
    try:
        ok = client.store(tokens_key(args.run), token_subkey(owner.public_bytes, peer), token, expires)
    finally:
        client.shutdown()
    if not ok:
        print("swarmloco: the DHT did not store the token", file=sys.stderr)
        return 1
    print(f"swarmloco: token for {peer.hex()} in run '{args.run}' published, valid {args.valid_days:g} days",
          file=sys.stderr)
    return 0
