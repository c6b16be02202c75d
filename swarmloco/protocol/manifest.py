"""The run manifest: the part of the config every peer of a swarm must share.

Its hash is part of every DHT key and of the averager's group prefix, so peers whose model, data,
optimizer, codec or access settings differ never average together. The manifest is published under the
run's name (``sl_<run>_manifest``) as a signed record (``records.py``, kind ``manifest``), so a peer with a
different one is told which fields differ and exits instead of training alone, and ``swarmloco join`` can
build a peer from it:

* an **owned** run (``access.owner`` set by ``swarmloco init-run``) counts only the manifest its owner
  signed, and its peers' DHT validators accept no other author under the key. Peers re-publish the owner's
  record as it is, so it lives as long as the swarm, until the expiry the owner chose;
* an **unowned** run: each peer publishes the manifest it runs, signed by itself. ``join`` refuses such
  runs: nobody vouches for them.

Peers also list their run in a small directory (``sl_index_runs``), so ``swarmloco join MADDR`` can find the
run of a swarm that runs only one.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import msgpack

from swarmloco.config import RunConfig
from swarmloco.protocol.identity import Identity
from swarmloco.protocol.records import RecordError, decode_record, encode_record
from swarmloco.protocol.validators import DEFAULT_PREFIX, SignedRecordValidator, swarm_key

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KIND = "manifest"
INDEX_KIND = "runs"
INDEX_KEY = f"{DEFAULT_PREFIX}index_runs"
"""Where peers list the runs they take part in (``swarmloco join MADDR`` with no run named)."""


class ManifestMismatch(RuntimeError):
    """This peer's manifest differs from the one the swarm runs."""


def canonical_bytes(data: dict[str, Any]) -> bytes:
    """Deterministic msgpack of nested dicts (keys sorted at every level)."""

    def sort(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: sort(value[k]) for k in sorted(value)}
        if isinstance(value, (list, tuple)):
            return [sort(v) for v in value]
        return value

    return msgpack.packb(sort(data), use_bin_type=True)


@dataclass(frozen=True)
class RunManifest:
    """The shared run definition and its hash."""

    data: dict[str, Any]
    hash: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunManifest:
        return cls(data=data, hash=hashlib.sha256(canonical_bytes({"v": SCHEMA_VERSION, **data})).hexdigest())

    @classmethod
    def from_config(cls, cfg: RunConfig) -> RunManifest:
        return cls.from_dict(cfg.manifest_dict())

    @property
    def run_id(self) -> str:
        return str(self.data["run_id"])

    @property
    def short(self) -> str:
        return self.hash[:12]

    @property
    def key_prefix(self) -> str:
        """Prefix of every DHT key of this run (no dots: hivemind's averager forbids them)."""
        return f"sl_{self.run_id}_{self.hash[:16]}"

    @property
    def run_key(self) -> str:
        return run_key(self.run_id)

    @property
    def progress_key(self) -> str:
        return f"{self.key_prefix}_progress"

    @property
    def tokens_key(self) -> str:
        return tokens_key(self.run_id)

    @property
    def owner(self) -> bytes | None:
        """The owner's public key (``access.owner``), None for an unowned run."""
        access = self.data.get("access")
        text = access.get("owner") if isinstance(access, dict) else None
        try:
            return bytes.fromhex(text) if isinstance(text, str) and len(text) == 64 else None
        except ValueError:
            return None

    @property
    def private(self) -> bool:
        access = self.data.get("access")
        return isinstance(access, dict) and access.get("private") is True

    def validator(self) -> SignedRecordValidator:
        """The DHT validator of this run's keys: signed records, author-owned subkeys; in an owned run only
        the owner may write the manifest and tokens."""
        keys = [self.progress_key, self.run_key, self.tokens_key, INDEX_KEY]
        owner = self.owner
        authors = {self.run_key: [owner], self.tokens_key: [owner]} if owner else {}
        return SignedRecordValidator(keys, allowed_authors=authors)


def run_key(run_id: str) -> str:
    """Where the manifest itself is published, under the run's name only."""
    return swarm_key(run_id, KIND)


def tokens_key(run_id: str) -> str:
    """Where the owner's access tokens of a run are published."""
    return swarm_key(run_id, "token")


@dataclass(frozen=True)
class SignedManifest:
    """A manifest record whose signature, key and hash were checked."""

    manifest: RunManifest
    author: bytes
    expires: float
    raw: bytes

    @property
    def by_owner(self) -> bool:
        """Signed by the owner the manifest itself names."""
        return self.manifest.owner is not None and self.manifest.owner == self.author


def sign_manifest(manifest: RunManifest, identity: Identity, expires_at: float) -> bytes:
    return encode_record(KIND, {"hash": manifest.hash, "manifest": manifest.data}, identity, expires_at,
                         key=manifest.run_key)


def read_manifest(raw: bytes, *, run_id: str, subkey: str, now: float) -> SignedManifest | None:
    """A valid manifest record of ``run_id`` stored under its author's subkey, else None (logged at debug)."""
    try:
        record = decode_record(raw, now=now)
    except RecordError as e:
        logger.debug("ignoring manifest record under subkey %.16s: %s", subkey, e)
        return None
    body = record.body
    if record.kind != KIND or record.key != run_key(run_id) or subkey != record.author_hex \
            or not isinstance(body.get("manifest"), dict):
        logger.debug("ignoring manifest record under subkey %.16s: wrong kind, key, subkey or body", subkey)
        return None
    try:
        manifest = RunManifest.from_dict(body["manifest"])
    except Exception:  # noqa: BLE001 - values msgpack cannot re-pack (never from a valid record)
        return None
    if manifest.hash != body.get("hash") or manifest.data.get("run_id") != run_id:
        logger.debug("ignoring manifest record under subkey %.16s: hash or run id does not match", subkey)
        return None
    return SignedManifest(manifest, record.author, record.expires, bytes(raw))


def read_manifests(values: dict[str, bytes], run_id: str, now: float) -> list[SignedManifest]:
    """Every valid manifest record among a DHT dictionary's ``{subkey: value}``."""
    found = (read_manifest(raw, run_id=run_id, subkey=subkey, now=now) for subkey, raw in values.items())
    return [m for m in found if m is not None]


def sign_index_entry(manifest: RunManifest, identity: Identity, expires_at: float) -> bytes:
    owner = manifest.owner
    return encode_record(INDEX_KIND, {"run": manifest.run_id, "owner": owner.hex() if owner else ""}, identity,
                         expires_at, key=INDEX_KEY)


def read_index(values: dict[str, bytes], now: float) -> list[tuple[str, str]]:
    """The (run id, owner hex) pairs the swarm's peers list, most listed first."""
    counts: dict[tuple[str, str], int] = {}
    for subkey, raw in values.items():
        try:
            record = decode_record(raw, now=now)
        except RecordError:
            continue
        run, owner = record.body.get("run"), record.body.get("owner")
        if record.kind != INDEX_KIND or record.key != INDEX_KEY or subkey != record.author_hex \
                or not isinstance(run, str) or not isinstance(owner, str) or len(run) > 64 or len(owner) > 64:
            continue
        counts[(run, owner)] = counts.get((run, owner), 0) + 1
    return sorted(counts, key=lambda k: (-counts[k], k))


def first_difference(mine: Any, theirs: Any) -> str | None:
    """One line naming the first parameter (in ``mine``'s order) where two model fingerprints (name ->
    "shape:dtype") differ; None if they are equal."""
    mine = mine if isinstance(mine, dict) else {}
    theirs = theirs if isinstance(theirs, dict) else {}
    for name, spec in mine.items():
        if name not in theirs:
            return f"parameter {name} ({spec}) is in this model, not in the swarm's"
        if theirs[name] != spec:
            return f"parameter {name} is {spec} here, {theirs[name]} in the swarm"
    for name, spec in theirs.items():
        if name not in mine:
            return f"parameter {name} ({spec}) is in the swarm's model, not in this one"
    return None


def diff_fields(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two manifests (the model by its first differing
    parameter, its initial parameters by their digest)."""
    out = []
    if not prefix and a.get("fingerprint") != b.get("fingerprint"):
        out.append(first_difference(a.get("fingerprint"), b.get("fingerprint")) or "the model's parameters")
    elif not prefix and a.get("genesis") != b.get("genesis"):
        out.append(f"the model's initial parameters (digest {str(a.get('genesis'))[:12]} here, "
                   f"{str(b.get('genesis'))[:12]} in the swarm: build the model from the same seed and code)")
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if not prefix and key in ("fingerprint", "genesis"):
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(diff_fields(va, vb, name + "."))
        elif va != vb:
            out.append(f"{name} ({va!r} here, {vb!r} in the swarm)")
    return out


def check_against_swarm(mine: RunManifest, published: list[RunManifest]) -> None:
    """Raise ManifestMismatch if the swarm runs another manifest under our run id and none runs ours."""
    others = [m for m in published if m.hash != mine.hash]
    if not others or any(m.hash == mine.hash for m in published):
        return
    theirs = max(set(m.hash for m in others), key=lambda h: sum(m.hash == h for m in others))
    other = next(m for m in others if m.hash == theirs)
    raise ManifestMismatch(
        f"run '{mine.run_id}' in this swarm uses manifest {other.short}, this peer has {mine.short}; "
        f"differing fields: {'; '.join(diff_fields(mine.data, other.data)) or '(schema)'}"
    )
