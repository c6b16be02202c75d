"""The run manifest: the part of the config every peer of a swarm must share.

Its hash is part of every DHT key and of the averager's group prefix, so peers whose model, data,
optimizer or codec settings differ can never average together. Peers also publish the manifest
itself under the run's name, so that a peer with a different manifest is told which fields differ
and exits instead of silently training alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack

from swarmloco.config import RunConfig

SCHEMA_VERSION = 1


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

    def to_bytes(self) -> bytes:
        return canonical_bytes({"v": SCHEMA_VERSION, "hash": self.hash, "manifest": self.data})


def run_key(run_id: str) -> str:
    """Where peers publish the manifest itself, under the run's name only."""
    return f"sl_{run_id}_manifest"


def manifest_from_bytes(raw: bytes) -> RunManifest | None:
    """Parse a published manifest; None if it is malformed or its hash does not match its content."""
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=1 << 16, max_str_len=1 << 16)
    except Exception:  # noqa: BLE001 - hostile bytes
        return None
    if not isinstance(obj, dict) or obj.get("v") != SCHEMA_VERSION or not isinstance(obj.get("manifest"), dict):
        return None
    manifest = RunManifest.from_dict(obj["manifest"])
    return manifest if manifest.hash == obj.get("hash") else None


def diff_fields(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two manifests."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
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
