"""Owned runs: the owner publishes a signed manifest, anyone joins from it with no config file.

``swarmloco init-run CONFIG --identity OWNER_KEY`` signs the manifest (its ``access.owner`` set to the
owner's key, so the owner is part of what every peer agrees on) and keeps a DHT node up that re-publishes
it: that node is also the stable address others join through.

``swarmloco join MADDR [RUN[@OWNER]]`` finds the run (the swarm's directory, if it runs only one),
fetches the manifest, accepts it only if it is signed by the owner it names (and, with ``@OWNER``, that
this is the owner the user expects), builds the config from it plus local settings, and starts a peer.
A manifest that would read local files (``data.path``) is refused unless the user says so: a run's
owner must not be able to make volunteers train on (and so leak through their updates) their own files.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from swarmloco.config import RunConfig, config_from_dict, config_to_dict
from swarmloco.protocol.identity import Identity
from swarmloco.protocol.manifest import (INDEX_KEY, RunManifest, SignedManifest, read_index, read_manifests,
                                         run_key, sign_index_entry, sign_manifest, tokens_key)
from swarmloco.protocol.validators import SignedRecordValidator

logger = logging.getLogger(__name__)

LOCAL_SECTIONS = ("swarm", "checkpoint", "status")


class JoinError(RuntimeError):
    """The run cannot be joined as asked; ``exit_code`` 2 (bad request) or 3 (refused)."""

    def __init__(self, message: str, exit_code: int = 3):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class RunSpec:
    """``RUN`` or ``RUN@OWNER_HEX`` from the command line."""

    run_id: str
    owner: bytes | None = None

    @classmethod
    def parse(cls, text: str) -> RunSpec:
        run_id, _, owner = text.partition("@")
        if not run_id or len(run_id) > 64 or not run_id.replace("-", "").replace("_", "").isalnum():
            raise JoinError(f"bad run name {run_id!r}: 1-64 letters, digits, '-' or '_'", 2)
        if not owner:
            return cls(run_id)
        try:
            key = bytes.fromhex(owner)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise JoinError(f"bad owner key {owner[:70]!r}: give the owner's public key as 64 hex chars", 2)
        return cls(run_id, key)

    def __str__(self) -> str:
        return f"{self.run_id}@{self.owner.hex()}" if self.owner else self.run_id


def owned_config(cfg: RunConfig, owner: Identity) -> RunConfig:
    """``cfg`` with ``access.owner`` set to the owner's key (JoinError if the config names another)."""
    named = cfg.access.owner
    if named and named != owner.public_hex:
        raise JoinError(f"the config's access.owner {named[:16]}... is not the key in the identity file "
                        f"({owner.public_hex[:16]}...)", 2)
    return config_from_dict({**config_to_dict(cfg), "access": {**config_to_dict(cfg)["access"],
                                                              "owner": owner.public_hex}})


def publish_owned_run(transport: Any, manifest: RunManifest, owner: Identity, valid_s: float) -> bytes:
    """Sign and store the manifest and a directory entry; returns the signed manifest record."""
    expires = time.time() + valid_s
    record = sign_manifest(manifest, owner, expires)
    stored = transport.store(manifest.run_key, owner.public_hex, record, expires)
    transport.store(INDEX_KEY, owner.public_hex, sign_index_entry(manifest, owner, expires), expires)
    if not stored:
        logger.warning("the DHT did not confirm storing the manifest (no other node yet?); it is kept here")
    return record


def serve_owned_run(transport: Any, manifest: RunManifest, owner: Identity, valid_s: float,
                    stop: threading.Event, every_s: float = 60.0) -> None:
    """Re-publish the manifest every ``every_s`` seconds until ``stop`` (the DHT drops entries of nodes
    that leave; peers re-publish it too)."""
    while not stop.wait(every_s):
        publish_owned_run(transport, manifest, owner, valid_s)


def join_validator(spec: RunSpec) -> SignedRecordValidator:
    """Validator for the keys of ``spec`` known before its manifest is (what ``join`` reads first, what a
    ``bootstrap --run`` node guards): the manifest key, the directory and, with an owner, the tokens."""
    key = run_key(spec.run_id)
    if not spec.owner:
        return SignedRecordValidator([key, INDEX_KEY])
    tokens = tokens_key(spec.run_id)
    return SignedRecordValidator([key, INDEX_KEY, tokens], allowed_authors={key: [spec.owner], tokens: [spec.owner]})


def guard_runs(client: Any, specs: list[RunSpec], stop: threading.Event, every_s: float = 30.0) -> None:
    """Until ``stop``: look up the owner-signed manifests of ``specs`` and register each new one's full
    validator (its heartbeat key depends on the manifest hash), so a bootstrap node validates those too."""
    known: set[str] = set()
    while True:
        for spec in specs:
            if spec.owner is None:
                continue
            found = read_manifests(client.get(run_key(spec.run_id)), spec.run_id, time.time())
            for signed in found:
                if signed.by_owner and signed.author == spec.owner and signed.manifest.hash not in known:
                    known.add(signed.manifest.hash)
                    client.add_validators([signed.manifest.validator()])
                    logger.info("validating the records of run '%s' (manifest %s)", spec.run_id,
                                signed.manifest.short)
        if stop.wait(every_s if known else min(every_s, 5.0)):  # look often until the owner has published
            return


def find_run(get: Callable[[str], dict[str, bytes]], spec: RunSpec | None) -> RunSpec:
    """The run to join: ``spec``, or the only owned run in the swarm's directory."""
    if spec is not None:
        return spec
    runs = [(run, owner) for run, owner in read_index(get(INDEX_KEY), time.time()) if owner]
    if len(runs) == 1:
        return RunSpec(runs[0][0], bytes.fromhex(runs[0][1]))
    if not runs:
        raise JoinError("no owned run found through this address (yet); name it: swarmloco join MADDR RUN", 3)
    listed = ", ".join(f"{run}@{owner}" for run, owner in runs[:8])
    raise JoinError(f"this swarm runs several owned runs, name one: {listed}", 2)


def fetch_manifest(get: Callable[[str], dict[str, bytes]], spec: RunSpec, timeout: float,
                   poll: float = 1.0, stop: threading.Event | None = None) -> SignedManifest:
    """The owner-signed manifest of ``spec`` (JoinError if none, or several owners claim the run, or
    ``stop`` is set while waiting for it)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in read_manifests(get(run_key(spec.run_id)), spec.run_id, time.time()) if m.by_owner]
        if spec.owner is not None:
            found = [m for m in found if m.author == spec.owner]
        owners = sorted({m.author.hex() for m in found})
        if len(owners) == 1:
            return max(found, key=lambda m: m.expires)
        if len(owners) > 1:
            raise JoinError(f"run '{spec.run_id}' is claimed by several owners; pin one with "
                            f"{spec.run_id}@OWNER: {', '.join(owners)}", 2)
        if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            who = f" signed by {spec.owner.hex()[:16]}..." if spec.owner else " signed by its owner"
            raise JoinError(f"no manifest of run '{spec.run_id}'{who} found in the DHT in {timeout:.0f}s "
                            "(unowned runs are joined with: swarmloco run CONFIG)", 3)
        if stop is not None:
            stop.wait(poll)
        else:
            time.sleep(poll)


def _hub_id(value: str) -> bool:
    """``owner/name`` with no path-like parts: a hub model id, not a file on this machine."""
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and "\\" not in value


def config_from_manifest(signed: SignedManifest, local: RunConfig, trust_data_path: bool = False) -> RunConfig:
    """The run's config: the manifest's sections plus this peer's own ``swarm``/``checkpoint``/``status``."""
    data = signed.manifest.data
    for section, name in (("data", "path"), ("data", "tokenizer"), ("model", "pretrained")):
        value = data.get(section, {}).get(name) if isinstance(data.get(section), dict) else None
        local_path = isinstance(value, str) and value and (section == "data" or not _hub_id(value))
        if local_path and not trust_data_path:
            raise JoinError(f"the run's manifest reads {section}.{name} from the local path {value!r}; join with "
                            "--trust-data-path if you mean to train on that", 3)
    mine = config_to_dict(local)
    try:
        shared = {k: v for k, v in data.items() if k not in ("fingerprint", "genesis")}  # derived from the model
        cfg = config_from_dict({**shared, **{name: mine[name] for name in LOCAL_SECTIONS}})
    except ValueError as e:
        raise JoinError(f"the run's manifest is not a config this version understands: {e}", 3) from None
    from swarmloco.app.peer import run_manifest

    rebuilt = run_manifest(cfg)
    if rebuilt.hash != signed.manifest.hash:
        raise JoinError("this swarmloco version builds a different manifest from the owner's (another "
                        "version?); upgrade to the owner's version", 3)
    return cfg


__all__ = ["JoinError", "RunSpec", "config_from_manifest", "fetch_manifest", "find_run", "guard_runs", "join_validator",
           "owned_config", "publish_owned_run", "serve_owned_run"]
