"""Certificates of committed rounds: evidence any peer can check offline that a round happened.

When a group commits outer step ``r`` (global parameters with digest ``parent`` -> digest ``digest``),
every member signs the same **round header** with its Ed25519 key::

    ["swarmloco-round-v1", manifest hash, r, parent (32 B), digest (32 B), sha256(members), samples]

``members``: the group's public keys, sorted; ``samples``: what the group processed (equal on every
member). The **certificate** is the header, the member list and the signatures (each member adds its own
and collects the others' from their heartbeats, :mod:`swarmloco.protocol.progress`). Only a member whose
signature verifies counts as a contributor; a member list nobody signed is no evidence.

Certificate ``r`` starts from the digest certificate ``r-1`` ends at. :func:`check_segment` verifies a chain
from a point the receiver trusts (its own chain, the genesis) to a claimed tip, before a peer adopts a state
another serves (:mod:`swarmloco.node.lineage`). Input may be hostile: :meth:`Certificate.decode` bounds
sizes, types and counts, and every failure is a one-line :class:`CertificateError`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import msgpack

from swarmloco.protocol.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity

DOMAIN = "swarmloco-round-v1"
DIGEST_SIZE = 32
MAX_MEMBERS = 256
MAX_CERT_BYTES = 64 + MAX_MEMBERS * (PUBLIC_KEY_SIZE + SIGNATURE_SIZE + 8) + 256
MAX_SAMPLES = 1 << 62


class CertificateError(ValueError):
    """A certificate or a chain of them is not valid evidence (the message says why, in one line)."""


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def members_hash(members: tuple[bytes, ...]) -> bytes:
    return hashlib.sha256(b"".join(members)).digest()


@dataclass(frozen=True)
class RoundHeader:
    """What every member of a committed round signs."""

    manifest: str
    """The run manifest's hash (hex): a certificate of one run is no evidence in another."""
    step: int
    """The outer step the round committed: its state moved from step ``step`` to ``step + 1``."""
    parent: bytes
    """sha256 of the global parameters before the round (at ``step``)."""
    digest: bytes
    """sha256 of the global parameters after it (at ``step + 1``)."""
    members: tuple[bytes, ...]
    """The group's Ed25519 public keys, sorted."""
    samples: int = 0
    """Samples the group processed for the round (its members' claims, summed)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.step, int) and 0 <= self.step < 1 << 62):
            raise CertificateError(f"step {self.step!r:.20} is out of range")
        for name in ("parent", "digest"):
            value = getattr(self, name)
            if not (isinstance(value, bytes) and len(value) == DIGEST_SIZE):
                raise CertificateError(f"{name} must be {DIGEST_SIZE} bytes")
        if not (isinstance(self.members, tuple) and 0 < len(self.members) <= MAX_MEMBERS):
            raise CertificateError(f"a round needs 1 to {MAX_MEMBERS} members")
        if any(not (isinstance(m, bytes) and len(m) == PUBLIC_KEY_SIZE) for m in self.members):
            raise CertificateError(f"members must be {PUBLIC_KEY_SIZE}-byte public keys")
        if list(self.members) != sorted(set(self.members)):
            raise CertificateError("members must be sorted and distinct")
        if not (isinstance(self.samples, int) and 0 <= self.samples < MAX_SAMPLES):
            raise CertificateError("samples out of range")
        if not isinstance(self.manifest, str) or len(self.manifest) > 128:
            raise CertificateError("malformed manifest hash")

    def payload(self) -> bytes:
        """The exact bytes a member signs (domain-separated from every other signature we make)."""
        return _pack([DOMAIN, self.manifest, self.step, self.parent, self.digest, members_hash(self.members),
                      self.samples])


@dataclass(frozen=True)
class Certificate:
    """A round header, and member index -> that member's signature of it (not yet checked)."""

    header: RoundHeader
    sigs: tuple[tuple[int, bytes], ...] = field(default=())

    @property
    def step(self) -> int:
        return self.header.step

    @property
    def parent(self) -> bytes:
        return self.header.parent

    @property
    def digest(self) -> bytes:
        return self.header.digest

    def signers(self) -> frozenset[bytes]:
        """The members whose signature verifies (memoized: a chain is checked again and again)."""
        return _verified_signers(self)

    def with_signature(self, public_key: bytes, sig: bytes) -> Certificate | None:
        """This certificate plus ``public_key``'s signature, or None if it is no member, already signed,
        or the signature does not verify."""
        try:
            index = self.header.members.index(public_key)
        except ValueError:
            return None
        if any(i == index for i, _ in self.sigs) or not Identity.verify(public_key, self.header.payload(), sig):
            return None
        return Certificate(self.header, tuple(sorted(self.sigs + ((index, sig),))))

    def encode(self) -> bytes:
        h = self.header
        return _pack({"v": 1, "m": h.manifest, "s": h.step, "p": h.parent, "d": h.digest, "n": h.samples,
                      "mem": list(h.members), "sig": [[i, s] for i, s in self.sigs]})

    @classmethod
    def decode(cls, raw: bytes) -> Certificate:
        """Parse a certificate from untrusted bytes (signatures are checked by :meth:`signers`)."""
        if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_CERT_BYTES:
            raise CertificateError("certificate is not bytes or is oversized")
        try:
            obj = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True, max_bin_len=MAX_CERT_BYTES,
                                  max_str_len=256, max_array_len=MAX_MEMBERS, max_map_len=16, max_ext_len=0)
        except Exception as e:  # noqa: BLE001 - msgpack raises many types on hostile bytes
            raise CertificateError(f"certificate is not msgpack: {type(e).__name__}") from None
        if not isinstance(obj, dict) or obj.get("v") != 1 or set(obj) != {"v", "m", "s", "p", "d", "n", "mem", "sig"}:
            raise CertificateError("certificate has the wrong fields or version")
        members, sigs = obj["mem"], obj["sig"]
        if not isinstance(members, list) or not isinstance(sigs, list) or len(sigs) > len(members):
            raise CertificateError("malformed member or signature list")
        pairs = []
        for item in sigs:
            if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and isinstance(item[1], bytes)
                    and 0 <= item[0] < len(members) and len(item[1]) == SIGNATURE_SIZE):
                raise CertificateError("malformed signature entry")
            pairs.append((item[0], item[1]))
        if len({i for i, _ in pairs}) != len(pairs):
            raise CertificateError("a member signed twice")
        if type(obj["s"]) is not int or type(obj["n"]) is not int:
            raise CertificateError("step and samples must be integers")
        header = RoundHeader(manifest=obj["m"], step=obj["s"], parent=obj["p"], digest=obj["d"],
                             members=tuple(members), samples=obj["n"])
        return cls(header, tuple(sorted(pairs)))


def sign_round(header: RoundHeader, identity: Identity) -> Certificate:
    """A new certificate for ``header`` holding ``identity``'s signature (it must be a member)."""
    if identity.public_bytes not in header.members:
        raise CertificateError("only a member of the round can sign it")
    index = header.members.index(identity.public_bytes)
    return Certificate(header, ((index, identity.sign(header.payload())),))


_CACHE: OrderedDict[bytes, frozenset[bytes]] = OrderedDict()
_CACHE_SIZE = 65536


def _verified_signers(cert: Certificate) -> frozenset[bytes]:
    payload = cert.header.payload()
    key = hashlib.sha256(payload + b"".join(bytes([i % 256, i // 256]) + s for i, s in cert.sigs)).digest()
    found = _CACHE.get(key)
    if found is None:
        found = frozenset(cert.header.members[i] for i, s in cert.sigs
                          if Identity.verify(cert.header.members[i], payload, s))
        _CACHE[key] = found
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return found


def check_segment(certs: list[Certificate], *, start_step: int, start_digest: bytes, manifest: str) -> None:
    """``certs`` are a chain of committed rounds from (``start_step``, ``start_digest``): consecutive steps,
    each starting from the digest the previous one ended at, of this run, each signed by a member."""
    step, digest = start_step, start_digest
    for cert in certs:
        h = cert.header
        if h.manifest != manifest:
            raise CertificateError(f"the certificate of outer step {h.step} belongs to another run")
        if h.step != step:
            raise CertificateError(f"the chain jumps from outer step {step} to {h.step}")
        if h.parent != digest:
            raise CertificateError(f"the certificate of outer step {h.step} does not start from the state before it")
        if not cert.signers():
            raise CertificateError(f"the certificate of outer step {h.step} carries no valid member signature")
        step, digest = step + 1, h.digest


__all__ = ["Certificate", "CertificateError", "RoundHeader", "check_segment", "members_hash", "sign_round"]
