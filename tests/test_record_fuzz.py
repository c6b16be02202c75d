"""Fuzzing: hostile bytes must only ever produce RecordError (decode) or False (validate).

~10,500 generated inputs in total: random bytes, random msgpack structures (including
record-shaped maps), mutations of valid records, and random DHTRecords for the validator.
test_decoder_fuzz.py fuzzes the same functions further (and counts these inputs towards its bar).
"""

import math
import time

import msgpack
from hypothesis import given
from hypothesis import strategies as st
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer

from fuzz_util import fuzz_settings
from swarmloco.protocol.identity import Identity
from swarmloco.protocol.records import Record, RecordError, decode_record, encode_record
from swarmloco.protocol.validators import SignedRecordValidator, author_subkey, swarm_key

AUTHOR = Identity.generate()
KEY = swarm_key("fuzz", "progress")
EXPIRES = time.time() + 3600
NOW = time.time()
VALID = encode_record("progress", {"step": 1, "loss": 0.5, "peers": ["a", "b"]}, AUTHOR, EXPIRES, key=KEY)
SUBKEY = author_subkey(AUTHOR.public_bytes)
VALIDATOR = SignedRecordValidator([KEY], max_size=4096)
KEY_ID = DHTID.generate(source=KEY).to_bytes()


def _decode_is_total(raw) -> None:
    try:
        result = decode_record(raw, now=NOW)
    except RecordError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(result, Record)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
structures = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_values = structures | st.sampled_from([1, 2, "progress", AUTHOR.public_bytes, b"s" * 64, EXPIRES, KEY, {}])
record_shaped = st.dictionaries(
    st.sampled_from(["v", "kind", "author", "expires", "key", "body", "sig", "x"]), field_values, max_size=8
)


@fuzz_settings(3000)
@given(st.binary(max_size=300))
def test_decode_random_bytes(raw):
    _decode_is_total(raw)


@fuzz_settings(2500)
@given(structures | record_shaped)
def test_decode_random_msgpack(obj):
    _decode_is_total(msgpack.packb(obj, use_bin_type=True))


mutation = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
    st.integers(0, len(VALID) - 1),
    st.integers(0, 255),
)
GENUINE = decode_record(VALID, now=NOW)


@fuzz_settings(2500)
@given(st.lists(mutation, min_size=1, max_size=4))
def test_decode_mutated_valid_record(mutations):
    raw = bytearray(VALID)
    for op, pos, byte in mutations:
        pos = min(pos, max(len(raw) - 1, 0))
        if op == "flip" and raw:
            raw[pos] ^= 1 << (byte % 8)
        elif op == "set" and raw:
            raw[pos] = byte
        elif op == "insert":
            raw.insert(pos, byte)
        elif op == "delete" and raw:
            del raw[pos]
        elif op == "truncate":
            del raw[pos:]
    raw = bytes(raw)
    _decode_is_total(raw)
    if raw != VALID:  # any byte-level change must not produce a *different* accepted record
        try:
            rec = decode_record(raw, now=NOW)
        except RecordError:
            return
        assert (rec.kind, rec.author, rec.key, rec.body, rec.sig) == (
            GENUINE.kind, GENUINE.author, GENUINE.key, GENUINE.body, GENUINE.sig
        )


values = st.one_of(
    st.binary(max_size=200),
    st.builds(MSGPackSerializer.dumps, st.binary(max_size=200)),
    st.builds(MSGPackSerializer.dumps, structures),
    st.builds(lambda cut: MSGPackSerializer.dumps(VALID[:cut]), st.integers(0, len(VALID))),
    st.builds(
        lambda i, b: MSGPackSerializer.dumps(VALID[:i] + bytes([b]) + VALID[i + 1 :]),
        st.integers(0, len(VALID) - 1),
        st.integers(0, 255),
    ),
)
subkeys = st.one_of(
    st.just(MSGPackSerializer.dumps(SUBKEY)),
    st.binary(max_size=80),
    st.builds(MSGPackSerializer.dumps, structures),
    st.sampled_from([b"", MSGPackSerializer.dumps(None), MSGPackSerializer.dumps(SUBKEY + ":tag")]),
)
expirations = st.floats(allow_nan=True, allow_infinity=True) | st.just(EXPIRES)


@fuzz_settings(2500)
@given(st.sampled_from([KEY_ID, KEY_ID, b"", b"\x00" * 20]) | st.binary(max_size=24), subkeys, values, expirations)
def test_validator_never_raises(key, subkey, value, expiration):
    record = DHTRecord(key, subkey, value, expiration)
    result = VALIDATOR.validate(record)
    assert isinstance(result, bool)
    if key == KEY_ID and value != MSGPackSerializer.dumps(VALID):
        # under our key, only the one genuine record (or a lossless re-encoding of it) may pass
        assert result is False or decode_record(msgpack.unpackb(value), now=NOW).sig == GENUINE.sig
    if key == KEY_ID and result:
        assert math.isfinite(expiration) and expiration <= EXPIRES + VALIDATOR.slack


def test_validator_accepts_the_genuine_record():
    """Sanity check for the fuzz oracle: the unmutated inputs do pass."""
    genuine = DHTRecord(KEY_ID, MSGPackSerializer.dumps(SUBKEY), MSGPackSerializer.dumps(VALID), EXPIRES)
    assert VALIDATOR.validate(genuine)
