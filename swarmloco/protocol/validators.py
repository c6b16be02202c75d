"""hivemind record validator for swarmloco's signed DHT records.

hivemind hands a validator only ``DHTID(key)`` (a SHA-1 of the raw key), so the validator is given the
raw keys it protects (each starts with ``prefix`` and ends with a suffix of ``SUFFIX_KINDS``;
``for_run(run_id)`` registers a run's keys). Records under any other key pass through, so hivemind's
own averager keys keep working. A protected entry is accepted (``validate`` never raises) only if:

* it is a dictionary entry whose subkey is the author's public key in lowercase hex, optionally
  followed by ``":"`` and a tag of 1-128 chars from ``[A-Za-z0-9_.:-]``: only the key's holder can
  write it, so no peer can overwrite another's entries;
* its value is a record (bytes) that ``decode_record`` accepts, bound to this raw key, of the kind the
  key's suffix calls for, and by one of the key's allowed authors if it has any;
* its DHT expiration is at most the signed ``expires`` + ``slack``: a stale record cannot be
  re-published fresh, and as hivemind keeps the latest expiration, an old record never displaces its
  author's newer one;
* its signed ``expires`` has not passed, with ``slack`` seconds of grace: hivemind rejects a whole
  dictionary if one entry fails, so an entry that expires in flight must not poison its neighbours.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from swarmloco.protocol.records import MAX_RECORD_SIZE, RecordError, decode_record

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "sl_"
SUFFIX_KINDS: Tuple[Tuple[str, str], ...] = (
    ("_progress", "progress"), ("_manifest", "manifest"), ("_tokens", "token"), ("_runs", "runs"))
_SUBKEY_RE = re.compile(r"([0-9a-f]{64})(?::[A-Za-z0-9_.:-]{1,128})?")
_MAX_SUBKEY_BYTES = 256
_WRAPPER_OVERHEAD = 5  # msgpack bin32 header that hivemind's serializer puts around our bytes


def swarm_key(run_id: str, kind: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The raw DHT key under which a run keeps records of ``kind``, e.g. ``sl_<run>_progress``."""
    for suffix, suffix_kind in SUFFIX_KINDS:
        if suffix_kind == kind:
            return f"{prefix}{run_id}{suffix}"
    raise ValueError(f"no DHT key suffix for record kind {kind!r}")


def author_subkey(author_public: bytes, tag: str = "") -> str:
    """The subkey an author must store its entries under (see the module's subkey rule)."""
    subkey = author_public.hex() + (f":{tag}" if tag else "")
    if not _SUBKEY_RE.fullmatch(subkey):
        raise ValueError(f"invalid subkey tag {tag!r}")
    return subkey


def _kind_for_key(key: str, prefix: str) -> str:
    if not key.startswith(prefix):
        raise ValueError(f"key {key!r} does not start with prefix {prefix!r}")
    for suffix, kind in SUFFIX_KINDS:
        if key.endswith(suffix):
            return kind
    raise ValueError(f"key {key!r} has none of the suffixes {[s for s, _ in SUFFIX_KINDS]}")


class SignedRecordValidator(RecordValidatorBase):
    """Accepts only author-signed swarmloco records under the registered keys (see module doc)."""

    def __init__(
        self,
        keys: Iterable[str] = (),
        *,
        prefix: str = DEFAULT_PREFIX,
        allowed_authors: Optional[Mapping[str, Iterable[bytes]]] = None,
        slack: float = 30.0,
        max_size: int = MAX_RECORD_SIZE,
        clock: Callable[[], float] = get_dht_time,
    ):
        """
        :param keys: raw DHT keys to protect; each must start with ``prefix`` and end with a
            known suffix, which fixes the record kind it accepts.
        :param allowed_authors: optional ``{raw key: public keys}``; entries under that key must
            be authored by one of them (e.g. only the swarm owner may issue tokens).
        :param slack: seconds of tolerance for clock skew and in-flight expiry.
        :param clock: time source (must be picklable: the DHT runs in a child process).
        """
        self.prefix = prefix
        self.slack = float(slack)
        self.max_size = int(max_size)
        self.clock = clock
        # DHTID bytes -> (raw key, kind, allowed authors or empty = anyone)
        self._rules: Dict[bytes, Tuple[str, str, frozenset]] = {}
        allowed_authors = dict(allowed_authors or {})
        keys = list(keys)
        unknown = set(allowed_authors).difference(keys)
        if unknown:
            raise ValueError(f"allowed_authors given for unregistered keys {sorted(unknown)}")
        for key in keys:
            rule = (key, _kind_for_key(key, prefix), frozenset(allowed_authors.get(key, ())))
            self._rules[DHTID.generate(source=key).to_bytes()] = rule

    @classmethod
    def for_run(
        cls, run_id: str, *, owner_public: Optional[bytes] = None, prefix: str = DEFAULT_PREFIX, **kwargs
    ) -> "SignedRecordValidator":
        """Protect a run's progress/manifest/token keys; if ``owner_public`` is given, only the
        owner may write manifest and token entries."""
        keys = [swarm_key(run_id, kind, prefix) for _, kind in SUFFIX_KINDS if kind != "runs"]
        authors = {}
        if owner_public is not None:
            authors = {swarm_key(run_id, kind, prefix): [owner_public] for kind in ("manifest", "token")}
        return cls(keys, prefix=prefix, allowed_authors=authors, **kwargs)

    @property
    def keys(self) -> Tuple[str, ...]:
        return tuple(sorted(rule[0] for rule in self._rules.values()))

    def validate(self, record: DHTRecord) -> bool:
        key_name = "?"
        try:
            rule = self._rules.get(record.key) if isinstance(record.key, bytes) else None
            if rule is None:
                return True  # not one of ours: leave it to hivemind's other validators
            key_name = rule[0]
            reason = self._rejection_reason(record, *rule)
        except Exception as e:  # validate must never raise into hivemind's RPC handlers
            reason = f"internal error {type(e).__name__}: {e}"
        if reason is None:
            return True
        logger.debug("rejected DHT record under %s: %s", key_name, reason)
        return False

    def _rejection_reason(self, record: DHTRecord, key: str, kind: str, authors: frozenset) -> Optional[str]:
        if not isinstance(record.subkey, bytes) or len(record.subkey) > _MAX_SUBKEY_BYTES:
            return "subkey missing or too long"
        try:
            subkey = msgpack.unpackb(record.subkey, raw=False, strict_map_key=True)
        except Exception:
            return "subkey is not msgpack"
        match = _SUBKEY_RE.fullmatch(subkey) if isinstance(subkey, str) else None
        if match is None:
            return f"subkey {subkey!r:.80} is not '<author hex>[:tag]' (plain values are not allowed)"

        if not isinstance(record.value, bytes) or len(record.value) > self.max_size + _WRAPPER_OVERHEAD:
            return "value oversized or not bytes"
        try:
            raw = msgpack.unpackb(record.value, raw=False, max_bin_len=self.max_size, max_str_len=self.max_size)
        except Exception:
            return "value is not msgpack"
        if not isinstance(raw, bytes):
            return f"value is a {type(raw).__name__}, expected the encoded record as bytes"
        try:
            rec = decode_record(raw, now=self.clock() - self.slack, max_size=self.max_size)
        except RecordError as e:
            return str(e)

        if rec.key != key:
            return f"record is bound to key {rec.key!r:.80}"
        if rec.kind != kind:
            return f"kind {rec.kind!r} not allowed under this key (expected {kind!r})"
        if rec.author.hex() != match.group(1):
            return "subkey belongs to another author"
        if authors and rec.author not in authors:
            return "author may not write under this key"
        expiration = record.expiration_time
        if not isinstance(expiration, (int, float)) or not math.isfinite(expiration):
            return "DHT expiration is not a finite number"
        if expiration > rec.expires + self.slack:
            return f"DHT expiration exceeds signed expiry by {expiration - rec.expires:.1f}s"
        return None

    def sign_value(self, record: DHTRecord) -> bytes:
        """No-op: the signature lives inside the msgpack record itself."""
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        """No-op: readers get the signed record back and can ``decode_record`` it themselves."""
        return record.value

    @property
    def priority(self) -> int:
        # Validated after (lower priority than) RSASignatureValidator (10), which strips its own
        # signature suffix first; before SchemaValidator (0).
        return 5

    def merge_with(self, other: RecordValidatorBase) -> bool:
        """Absorb another instance's keys if the settings agree and no key is claimed twice with
        different rules; otherwise both are applied in turn (every one must accept)."""
        if not isinstance(other, SignedRecordValidator):
            return False
        if (other.prefix, other.slack, other.max_size, other.clock) != (
            self.prefix,
            self.slack,
            self.max_size,
            self.clock,
        ):
            return False
        if any(self._rules.get(key_id, rule) != rule for key_id, rule in other._rules.items()):
            return False
        self._rules.update(other._rules)
        return True
