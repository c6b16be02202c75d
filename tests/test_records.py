"""Signed records, access tokens and the DHT validator (unit level and across two real DHTs)."""

import logging
import time

import hivemind
import msgpack
import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarmloco.protocol.access import check_token, issue_token, verify_token
from swarmloco.protocol.identity import Identity
from swarmloco.protocol.records import MAX_RECORD_SIZE, Record, RecordError, decode_record, encode_record
from swarmloco.protocol.validators import SignedRecordValidator, author_subkey, swarm_key

RUN = "testrun"
PROGRESS, MANIFEST, TOKENS = (swarm_key(RUN, k) for k in ("progress", "manifest", "token"))
ALICE, BOB = Identity.generate(), Identity.generate()


def _fields(raw: bytes) -> dict:
    return msgpack.unpackb(raw, raw=False)


def _resign(fields: dict, identity: Identity) -> bytes:
    """Re-sign arbitrary (possibly invalid) fields, to test checks that come after the signature."""
    unsigned = {k: fields[k] for k in fields if k != "sig"}
    return msgpack.packb({**unsigned, "sig": identity.sign(msgpack.packb(unsigned, use_bin_type=True))})


# ---------------------------------------------------------------- records


def test_roundtrip():
    now = time.time()
    raw = encode_record("progress", {"step": 7, "loss": 1.5, "tags": ["a"]}, ALICE, now + 60, key=PROGRESS)
    rec = decode_record(raw, now=now)
    assert isinstance(rec, Record)
    assert (rec.version, rec.kind, rec.author, rec.key) == (1, "progress", ALICE.public_bytes, PROGRESS)
    assert rec.body == {"step": 7, "loss": 1.5, "tags": ["a"]} and rec.expires == pytest.approx(now + 60)
    with pytest.raises(AttributeError):
        rec.kind = "other"  # frozen


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\xc1", "not msgpack"),
        (b"\x92\x01\x02", "not a map"),
        (msgpack.packb({"kind": "x"}), "missing schema version"),
        (msgpack.packb({"v": 2}), "unknown schema version"),
        (msgpack.packb({"v": True}), "unknown schema version"),
        (msgpack.packb({"v": 1, "kind": "x"}), "missing fields"),
        (msgpack.packb({1: 2}), "not msgpack"),  # strict_map_key
        (b"\xdd\xff\xff\xff\xff", "not msgpack"),  # array claiming 4G items
        (b"\x91" * 5000 + b"\xc0", "not msgpack"),  # nesting bomb
        ("text", "must be bytes"),
    ],
)
def test_malformed_inputs(raw, reason):
    with pytest.raises(RecordError, match=reason):
        decode_record(raw, now=0.0)


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("kind", "Bad Kind", "kind"),
        ("author", b"short", "author"),
        ("expires", 5, "expires"),
        ("expires", float("nan"), "expires"),
        ("key", 3, "key"),
        ("body", [1], "body"),
        ("body", {b"k": 1}, "body"),
        ("extra", 1, "unexpected fields"),
    ],
)
def test_typed_wrong_fields(field, value, reason):
    fields = _fields(encode_record("progress", {}, ALICE, time.time() + 60))
    fields[field] = value
    with pytest.raises(RecordError, match=reason):
        decode_record(_resign(fields, ALICE), now=time.time())


def test_bad_signature_expired_and_oversized():
    now = time.time()
    raw = encode_record("progress", {"step": 1}, ALICE, now + 60)
    fields = _fields(raw)
    fields["body"] = {"step": 2}  # tampered after signing
    with pytest.raises(RecordError, match="bad signature"):
        decode_record(msgpack.packb(fields), now=now)
    fields = _fields(raw)
    fields["author"] = BOB.public_bytes  # claims another author
    with pytest.raises(RecordError, match="bad signature"):
        decode_record(msgpack.packb(fields), now=now)
    with pytest.raises(RecordError, match="expired"):
        decode_record(raw, now=now + 61)
    big = encode_record("progress", {"blob": b"x" * 70_000}, ALICE, now + 60, max_size=1 << 20)
    with pytest.raises(RecordError, match="oversized"):
        decode_record(big, now=now)
    assert decode_record(big, now=now, max_size=1 << 20).body["blob"] == b"x" * 70_000


def test_encode_refuses_what_decode_would_reject():
    with pytest.raises(RecordError):
        encode_record("progress", {"blob": b"x" * MAX_RECORD_SIZE}, ALICE, time.time() + 60)
    with pytest.raises(RecordError):
        encode_record("Not A Kind", {}, ALICE, time.time() + 60)
    with pytest.raises(RecordError):
        encode_record("progress", {"nested": {1: 2}}, ALICE, time.time() + 60)
    with pytest.raises(RecordError):
        encode_record("progress", {"obj": object()}, ALICE, time.time() + 60)


# ---------------------------------------------------------------- access tokens


def test_tokens():
    now = time.time()
    token = issue_token(ALICE, BOB.public_bytes, RUN, now + 3600)
    assert verify_token(token, ALICE.public_bytes, BOB.public_bytes, RUN, now)
    for args, reason in [
        ((BOB.public_bytes, BOB.public_bytes, RUN, now), "owner"),
        ((ALICE.public_bytes, ALICE.public_bytes, RUN, now), "another peer"),
        ((ALICE.public_bytes, BOB.public_bytes, "otherrun", now), "another run"),
        ((ALICE.public_bytes, BOB.public_bytes, RUN, now + 7200), "expired"),
    ]:
        assert not verify_token(token, *args)
        with pytest.raises(RecordError, match=reason):
            check_token(token, *args)
    forged = _fields(token)
    forged["body"]["peer"] = ALICE.public_bytes
    assert not verify_token(msgpack.packb(forged), ALICE.public_bytes, ALICE.public_bytes, RUN, now)
    progress = encode_record("progress", {"peer": BOB.public_bytes, "run": RUN}, ALICE, now + 60, key=TOKENS)
    with pytest.raises(RecordError, match="not a token"):
        check_token(progress, ALICE.public_bytes, BOB.public_bytes, RUN, now)


# ---------------------------------------------------------------- validator, unit level


def _dht_record(key: str, raw, subkey, expiration: float) -> DHTRecord:
    return DHTRecord(
        DHTID.generate(source=key).to_bytes(),
        MSGPackSerializer.dumps(subkey),
        MSGPackSerializer.dumps(raw),
        expiration,
    )


def test_validator_rules(caplog):
    v = SignedRecordValidator.for_run(RUN, owner_public=ALICE.public_bytes)
    now = time.time()
    exp = now + 60
    good = encode_record("progress", {"step": 1}, BOB, exp, key=PROGRESS)
    assert v.validate(_dht_record(PROGRESS, good, author_subkey(BOB.public_bytes), exp))
    assert v.validate(_dht_record(PROGRESS, good, author_subkey(BOB.public_bytes, "gpu0"), exp))
    assert v.validate(_dht_record("someone_elses_key", b"anything", None, exp))  # pass-through
    with caplog.at_level(logging.DEBUG, logger="swarmloco.protocol.validators"):
        bad = [
            _dht_record(PROGRESS, good, author_subkey(ALICE.public_bytes), exp),  # someone else's subkey
            _dht_record(PROGRESS, good, None, exp),  # plain value, no subkey
            _dht_record(PROGRESS, good, BOB.public_bytes.hex().upper(), exp),
            _dht_record(PROGRESS, good, author_subkey(BOB.public_bytes), exp + 3600),  # DHT outlives signature
            _dht_record(MANIFEST, good, author_subkey(BOB.public_bytes), exp),  # bound to another key
            _dht_record(PROGRESS, b"garbage", author_subkey(BOB.public_bytes), exp),
            _dht_record(PROGRESS, {"not": "bytes"}, author_subkey(BOB.public_bytes), exp),
            _dht_record(PROGRESS, good, author_subkey(BOB.public_bytes), float("nan")),
        ]
        wrong_kind = encode_record("progress", {}, ALICE, exp, key=MANIFEST)
        bad.append(_dht_record(MANIFEST, wrong_kind, author_subkey(ALICE.public_bytes), exp))
        not_owner = encode_record("manifest", {}, BOB, exp, key=MANIFEST)
        bad.append(_dht_record(MANIFEST, not_owner, author_subkey(BOB.public_bytes), exp))
        stale = encode_record("progress", {}, BOB, now - 120, key=PROGRESS)
        bad.append(_dht_record(PROGRESS, stale, author_subkey(BOB.public_bytes), now - 120))
        for record in bad:
            assert v.validate(record) is False
    reasons = [r.getMessage() for r in caplog.records]
    assert len(reasons) == len(bad) and all("\n" not in r for r in reasons)
    assert any("another author" in r for r in reasons) and any("expired" in r for r in reasons)


def test_validator_merge_and_composite():
    a = SignedRecordValidator([PROGRESS])
    b = SignedRecordValidator([swarm_key("run2", "progress")])
    assert a.merge_with(b) and set(a.keys) == {PROGRESS, swarm_key("run2", "progress")}
    assert not a.merge_with(SignedRecordValidator([PROGRESS], slack=1.0))
    assert not a.merge_with(SignedRecordValidator([PROGRESS], allowed_authors={PROGRESS: [ALICE.public_bytes]}))
    composite = CompositeValidator([SignedRecordValidator([PROGRESS]), SignedRecordValidator([MANIFEST])])
    assert len(composite._validators) == 1
    with pytest.raises(ValueError):
        SignedRecordValidator(["no_prefix_progress"])
    with pytest.raises(ValueError):
        SignedRecordValidator(["sl_unknown_suffix"])


# ---------------------------------------------------------------- two real DHTs

TIMEOUT = 30
# hivemind 1.1.12's DHT front end ships store() arguments to its child process over a pipe
# that drops messages of more than ~16 KB intermittently (BlockingIOError in DHT._run, then the
# call hangs), so the DHT tests use a 4 KiB record limit to exercise "oversized" safely.
DHT_MAX_SIZE = 4096


def _store(dht, key, value, expiration, subkey=None) -> bool:
    return dht.store(key, value, expiration, subkey=subkey, return_future=True).result(timeout=TIMEOUT)


def _entries(dht, key) -> dict:
    """{subkey: raw record} that ``dht.get`` returns for a dictionary key (empty if none)."""
    found = dht.get(key, latest=True, return_future=True).result(timeout=TIMEOUT)
    if found is None or not isinstance(found.value, dict):
        return {}
    return {subkey: item.value for subkey, item in found.value.items()}


@pytest.fixture
def two_dhts():
    started = []
    try:
        a = hivemind.DHT(
            start=True,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            record_validators=[SignedRecordValidator.for_run(RUN, max_size=DHT_MAX_SIZE)],
        )
        started.append(a)
        b = hivemind.DHT(
            start=True,
            initial_peers=a.get_visible_maddrs(),
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            record_validators=[SignedRecordValidator.for_run(RUN, max_size=DHT_MAX_SIZE)],
        )
        started.append(b)
        yield a, b
    finally:
        for dht in started:
            dht.shutdown()


def test_two_dhts_accept_only_valid_records(two_dhts):
    a, b = two_dhts
    now = get_dht_time()
    exp = now + 120
    alice_sub, bob_sub = author_subkey(ALICE.public_bytes), author_subkey(BOB.public_bytes)
    good = encode_record("progress", {"step": 1}, ALICE, exp, key=PROGRESS)
    assert _store(a, PROGRESS, good, exp, subkey=alice_sub)

    forged = _fields(encode_record("progress", {"step": 2}, BOB, exp, key=PROGRESS))
    forged["body"]["step"] = 3
    expired = encode_record("progress", {"step": 4}, BOB, now - 120, key=PROGRESS)
    oversized = encode_record("progress", {"b": b"x" * 6000}, BOB, exp, key=PROGRESS, max_size=1 << 20)
    bob_as_alice = encode_record("progress", {"step": 5}, BOB, exp, key=PROGRESS)
    rejected = {
        "forged": (msgpack.packb(forged), bob_sub),
        "expired": (expired, bob_sub + ":expired"),
        "oversized": (oversized, bob_sub + ":big"),
        "garbage": (b"\x00garbage\xff", bob_sub + ":garbage"),
        "not_bytes": ({"step": 6}, bob_sub + ":dict"),
    }
    for name, (value, subkey) in rejected.items():
        assert not _store(a, PROGRESS, value, exp, subkey=subkey), name
    assert not _store(a, PROGRESS, bob_as_alice, exp, subkey=alice_sub)  # overwrite someone else's entry
    assert not _store(a, MANIFEST, b"garbage", exp)  # plain value under a protected key
    assert _store(a, "hivemind_own_key", b"anything", exp)  # unprotected keys are untouched

    for dht in (a, b):  # neither the storing peer nor the other one serves a rejected entry
        entries = _entries(dht, PROGRESS)
        assert entries == {alice_sub: good}, entries
        assert decode_record(entries[alice_sub], now=now).body == {"step": 1}
        assert dht.get(MANIFEST, latest=True, return_future=True).result(timeout=TIMEOUT) is None
    assert b.get("hivemind_own_key", latest=True, return_future=True).result(timeout=TIMEOUT).value == b"anything"


def test_hostile_peer_without_validator_cannot_inject(two_dhts):
    """A peer that skips validation stores garbage locally, but honest peers refuse it on store
    and drop it (with the hostile peer's whole answer) on get."""
    a, b = two_dhts
    hostile = hivemind.DHT(start=True, initial_peers=a.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        exp = get_dht_time() + 120
        garbage_sub = author_subkey(BOB.public_bytes)
        _store(hostile, PROGRESS, b"\x00garbage", exp, subkey=garbage_sub)
        assert garbage_sub in _entries(hostile, PROGRESS)  # the hostile peer does hold it
        for dht in (a, b):
            assert garbage_sub not in _entries(dht, PROGRESS)
    finally:
        hostile.shutdown()


def test_the_validator_a_peer_registers_protects_the_keys_it_uses():
    """RunManifest.validator() (what run/join register): heartbeats under the hash-suffixed key, and in
    an owned run only the owner writes the manifest and tokens."""
    from swarmloco.protocol.access import issue_token, token_subkey
    from swarmloco.protocol.manifest import RunManifest, sign_manifest

    manifest = RunManifest.from_dict({"run_id": RUN, "access": {"owner": ALICE.public_hex, "private": True}})
    validator = manifest.validator()
    validator.max_size = DHT_MAX_SIZE
    a = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[validator])
    try:
        exp = get_dht_time() + 120
        beat = encode_record("progress", {"step": 1}, BOB, exp, key=manifest.progress_key)
        assert _store(a, manifest.progress_key, beat, exp, subkey=author_subkey(BOB.public_bytes))
        assert not _store(a, manifest.progress_key, beat, exp, subkey=author_subkey(ALICE.public_bytes))
        older = encode_record("progress", {"step": 0}, BOB, exp - 60, key=manifest.progress_key)
        assert not _store(a, manifest.progress_key, older, exp - 60, subkey=author_subkey(BOB.public_bytes))
        assert _entries(a, manifest.progress_key)[author_subkey(BOB.public_bytes)] == beat  # a replay never wins
        by_bob = sign_manifest(manifest, BOB, exp)
        assert not _store(a, manifest.run_key, by_bob, exp, subkey=author_subkey(BOB.public_bytes))
        assert _store(a, manifest.run_key, sign_manifest(manifest, ALICE, exp), exp,
                      subkey=author_subkey(ALICE.public_bytes))
        self_issued = issue_token(BOB, BOB.public_bytes, RUN, exp)
        assert not _store(a, manifest.tokens_key, self_issued, exp, subkey=token_subkey(BOB.public_bytes, BOB.public_bytes))
        genuine = issue_token(ALICE, BOB.public_bytes, RUN, exp)
        assert _store(a, manifest.tokens_key, genuine, exp, subkey=token_subkey(ALICE.public_bytes, BOB.public_bytes))
        assert not _store(a, manifest.tokens_key, genuine, exp + 3600,  # a DHT expiry beyond the signed one
                          subkey=token_subkey(ALICE.public_bytes, BOB.public_bytes))
    finally:
        a.shutdown()
