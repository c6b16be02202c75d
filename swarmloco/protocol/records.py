"""Signed, versioned swarmloco DHT records.

Wire format (msgpack map, schema version 1)::

    {"v": 1, "kind": str, "author": 32-byte Ed25519 public key, "expires": float (unix time),
     "key": str, "body": {str: any}, "sig": 64-byte Ed25519 signature}

``sig`` signs the msgpack encoding of the same map without ``sig``, in the field order above. The verifier
re-packs the decoded fields rather than slicing the input, so the signature covers what the record says,
not one byte encoding of it. ``key`` binds a record to the raw DHT key it is written for (empty = unbound),
so a signed record cannot be replayed under another run's keys; the DHT validator requires it to match
(``validators.py``). Input may be hostile: ``decode_record`` bounds the size before parsing, parses with
strict msgpack limits, checks every field's type, and turns any failure into a one-line ``RecordError``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict

import msgpack

from swarmloco.protocol.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity

SCHEMA_VERSION = 1
MAX_RECORD_SIZE = 64 * 1024
MAX_KEY_LEN = 256
_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_SIGNED_FIELDS = ("v", "kind", "author", "expires", "key", "body")
_ALL_FIELDS = frozenset(_SIGNED_FIELDS + ("sig",))


class RecordError(ValueError):
    """A record was rejected; ``str(err)`` is a one-line reason suitable for a debug log."""


@dataclasses.dataclass(frozen=True)
class Record:
    """A decoded record whose signature has been checked (``body`` is shared, do not mutate)."""

    version: int
    kind: str
    author: bytes
    expires: float
    key: str
    body: Dict[str, Any]
    sig: bytes

    @property
    def author_hex(self) -> str:
        return self.author.hex()


def _pack(obj: Any) -> bytes:
    # use_bin_type keeps bytes and str distinct; floats always go out as float64 so that
    # signer and verifier produce identical bytes for the same values.
    return msgpack.packb(obj, use_bin_type=True, use_single_float=False)


def _unpack(raw: bytes, max_size: int) -> Any:
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max_size,
            max_str_len=max_size,
            max_array_len=max_size,
            max_map_len=max_size,
            max_ext_len=max_size,
        )
    except Exception as e:  # msgpack raises many types (ExtraData, StackError, UnicodeDecodeError...)
        raise RecordError(f"not msgpack: {type(e).__name__}") from None


def _signed_payload(fields: Dict[str, Any]) -> bytes:
    return _pack({name: fields[name] for name in _SIGNED_FIELDS})


def _check_structure(obj: Any) -> Dict[str, Any]:
    """Type-check a decoded map; returns it unchanged or raises RecordError."""
    if not isinstance(obj, dict):
        raise RecordError(f"record is a {type(obj).__name__}, not a map")
    if "v" not in obj:
        raise RecordError("missing schema version 'v'")
    version = obj["v"]
    if type(version) is not int or version != SCHEMA_VERSION:
        raise RecordError(f"unknown schema version {version!r:.40}")
    missing = _ALL_FIELDS.difference(obj)
    if missing:
        raise RecordError(f"missing fields {sorted(missing)}")
    extra = set(obj).difference(_ALL_FIELDS)
    if extra:
        raise RecordError(f"unexpected fields {sorted(map(repr, extra))[:5]}")
    kind, author, expires, key, body, sig = (obj[n] for n in ("kind", "author", "expires", "key", "body", "sig"))
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        raise RecordError("field 'kind' must match [a-z][a-z0-9_]{0,31}")
    if not isinstance(author, bytes) or len(author) != PUBLIC_KEY_SIZE:
        raise RecordError(f"field 'author' must be {PUBLIC_KEY_SIZE} bytes")
    if type(expires) is not float or not math.isfinite(expires):
        raise RecordError("field 'expires' must be a finite float")
    if not isinstance(key, str) or len(key) > MAX_KEY_LEN:
        raise RecordError(f"field 'key' must be a str of at most {MAX_KEY_LEN} chars")
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise RecordError("field 'body' must be a map with str keys")
    if not isinstance(sig, bytes) or len(sig) != SIGNATURE_SIZE:
        raise RecordError(f"field 'sig' must be {SIGNATURE_SIZE} bytes")
    return obj


def _to_record(obj: Dict[str, Any]) -> Record:
    return Record(obj["v"], obj["kind"], obj["author"], obj["expires"], obj["key"], obj["body"], obj["sig"])


def encode_record(
    kind: str,
    body: Dict[str, Any],
    identity: Identity,
    expires_at: float,
    *,
    key: str = "",
    max_size: int = MAX_RECORD_SIZE,
) -> bytes:
    """Sign and serialize a record.

    Raises ``RecordError`` if the result would be rejected by ``decode_record`` (bad kind,
    non-str body keys, oversized...), so a peer never publishes something others drop.
    """
    fields = {
        "v": SCHEMA_VERSION,
        "kind": kind,
        "author": identity.public_bytes,
        "expires": float(expires_at),
        "key": key,
        "body": body,
    }
    try:
        payload = _signed_payload(fields)
    except (TypeError, ValueError, OverflowError) as e:
        raise RecordError(f"body is not msgpack-serializable: {e}") from None
    fields["sig"] = identity.sign(payload)
    _check_structure(fields)
    raw = _pack(fields)
    if len(raw) > max_size:
        raise RecordError(f"record is {len(raw)} bytes, limit {max_size}")
    # Round-trip check: what peers decode (strict_map_key etc.) must re-pack to what we signed.
    try:
        ok = _signed_payload(_unpack(raw, max_size)) == payload
    except RecordError:
        ok = False
    if not ok:
        raise RecordError("body does not survive a strict msgpack round trip (map keys must be str/bytes)")
    return raw


def decode_record(raw: bytes, *, now: float, max_size: int = MAX_RECORD_SIZE) -> Record:
    """Parse and verify a record; raises ``RecordError`` (never anything else) on any problem.

    Checks, cheapest first: type and size, msgpack structure, schema, expiry, signature.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise RecordError(f"record must be bytes, got {type(raw).__name__}")
    size = memoryview(raw).nbytes
    if size > max_size:
        raise RecordError(f"oversized record: {size} bytes > {max_size}")
    obj = _check_structure(_unpack(bytes(raw), max_size))
    if obj["expires"] <= now:
        raise RecordError(f"expired {now - obj['expires']:.1f}s ago")
    try:
        payload = _signed_payload(obj)
    except Exception as e:  # decoded values always re-pack, but stay total on hostile input
        raise RecordError(f"cannot re-encode record: {type(e).__name__}") from None
    if not Identity.verify(obj["author"], payload, obj["sig"]):
        raise RecordError("bad signature")
    return _to_record(obj)
