"""Every decoder and validator of untrusted bytes, fuzzed: hostile inputs only ever produce the
documented one-line error (``RecordError``, ``CodecError``) or a rejection (``False``), never a crash,
and nothing a hostile peer can make is accepted unless it is a genuine input (or a lossless
re-encoding of one).

``TARGETS`` lists them; each entry gets ``count`` generated inputs (see ``fuzz_util.FuzzTarget``) and
``test_every_target_gets_enough_inputs`` holds every entry, with what other fuzz tests feed it
(``elsewhere``), to the issue's 10,000. To fuzz a new decoder, append one entry, e.g.::

    FuzzTarget("progress.read_progress", lambda raw: read_progress(raw, key=KEY, subkey=SUB, now=NOW),
               hostile_msgpack([<a few genuine encodings>]), (RecordError,))

Inputs are random bytes, genuine encodings after random byte edits, and (for msgpack formats)
genuine structures after random field edits; the structured targets (the DHT validator, access
tokens, all-reduce parts) also mix genuine and hostile keys, subkeys, owners, peers, runs, shapes and
tags. Identities come from fixed seeds and the inputs are derandomized: every run is the same.
"""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from fuzz_util import (
    REQUIRED_INPUTS, SCALE, FuzzTarget, HostileBytes, digits, edit_program, fields_program, hostile, hostile_bytes,
    hostile_msgpack,
    mutate, mutate_msgpack, random_bytes, run_target,
)
from swarmloco.compression import CodecError, codec_names, get_codec
from swarmloco.compression.header import (
    CODEC_IDS, HEADER, HEADER_SIZE, MAGIC, MAX_BLOCK_SIZE, pack_header, read_header,
)
from swarmloco.compression.hivemind_bridge import TAG_PREFIX, decode_part
from swarmloco.config import CodecConfig
from swarmloco.app.joining import JoinError, RunSpec
from swarmloco.node.lineage import Chain
from swarmloco.protocol.access import check_token, issue_token, read_tokens, token_subkey
from swarmloco.protocol.certificates import Certificate, CertificateError, RoundHeader, check_segment, sign_round
from swarmloco.protocol.identity import Identity, public_key_of_peer_id
from swarmloco.protocol.manifest import RunManifest, read_index, read_manifest, sign_index_entry, sign_manifest
from swarmloco.protocol.progress import STATES, PeerProgress, read_progress
from swarmloco.protocol.records import Record, RecordError, decode_record, encode_record
from swarmloco.protocol.validators import SignedRecordValidator, author_subkey, swarm_key

NOW = 1_700_000_000.0
EXPIRES = NOW + 3600
RUN = "fuzz"
OWNER, PEER, OTHER = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))
KEYS = {kind: swarm_key(RUN, kind) for kind in ("progress", "manifest", "token")}
KEY_IDS = {kind: DHTID.generate(source=key).to_bytes() for kind, key in KEYS.items()}
KIND_OF_KEY_ID = {key_id: kind for kind, key_id in KEY_IDS.items()}

# ----- genuine signed records: the seeds of the record, validator and token targets ----------------

PROGRESS_BODY = {"step": 3, "loss": 2.5, "samples": 4096, "peers": [PEER.public_hex], "maddrs": ["/ip4/1.2.3.4/tcp/5"],
                 "ratio": 0.25, "ok": True, "none": None, "blob": b"\x00\x01"}
MANIFEST_BODY = {"config": {"model": {"n_layer": 2, "n_embd": 64}, "codec": {"name": "int8", "block_size": 256}},
                 "hash": b"\x11" * 32, "step": 0}
PROGRESS = encode_record("progress", PROGRESS_BODY, PEER, EXPIRES, key=KEYS["progress"])
PROGRESS_OTHER = encode_record("progress", {"step": 1}, OTHER, EXPIRES, key=KEYS["progress"])
PROGRESS_GRACE = encode_record("progress", {"step": 2}, PEER, NOW - 5, key=KEYS["progress"])  # expired, within slack
PROGRESS_ELSEWHERE = encode_record("progress", {"step": 1}, PEER, EXPIRES, key=swarm_key("other", "progress"))
UNBOUND = encode_record("progress", {"step": 1}, PEER, EXPIRES)
MANIFEST = encode_record("manifest", MANIFEST_BODY, OWNER, EXPIRES, key=KEYS["manifest"])
MANIFEST_NOT_OWNER = encode_record("manifest", MANIFEST_BODY, OTHER, EXPIRES, key=KEYS["manifest"])
TOKEN = issue_token(OWNER, PEER.public_bytes, RUN, EXPIRES)
TOKEN_OTHER_PEER = issue_token(OWNER, OTHER.public_bytes, RUN, EXPIRES)
TOKEN_OTHER_RUN = issue_token(OWNER, PEER.public_bytes, "other", EXPIRES)
TOKEN_NOT_OWNER = issue_token(OTHER, PEER.public_bytes, RUN, EXPIRES)
TOKEN_KEY_MISMATCH = encode_record("token", {"peer": PEER.public_bytes, "run": RUN}, OWNER, EXPIRES,
                                   key=swarm_key("other", "token"))
TOKEN_PEER_AS_HEX = encode_record("token", {"peer": PEER.public_hex, "run": RUN}, OWNER, EXPIRES, key=KEYS["token"])
RECORDS = [PROGRESS, PROGRESS_OTHER, PROGRESS_GRACE, PROGRESS_ELSEWHERE, UNBOUND, MANIFEST, MANIFEST_NOT_OWNER,
           TOKEN, TOKEN_OTHER_PEER, TOKEN_OTHER_RUN, TOKEN_NOT_OWNER, TOKEN_KEY_MISMATCH, TOKEN_PEER_AS_HEX]
RECORD_OBJECTS = {raw: msgpack.unpackb(raw, raw=False) for raw in RECORDS}
GENUINE = {rec.sig: rec for rec in (decode_record(raw, now=NOW - 3600) for raw in RECORDS)}


def _same_record(rec: Record) -> None:
    """An accepted record must be a genuine one, field for field (re-encodings are fine, edits are not)."""
    genuine = GENUINE.get(rec.sig)
    assert genuine is not None, f"accepted a record with an unknown signature: {rec}"
    assert (rec.kind, rec.author, rec.expires, rec.key, rec.body) == (
        genuine.kind, genuine.author, genuine.expires, genuine.key, genuine.body
    )


# ----- 1. records.decode_record -------------------------------------------------------------------

NOT_BYTES = [None, "text", 0, [], bytearray(PROGRESS), memoryview(MANIFEST)]


def _check_record(raw, rec) -> None:
    assert isinstance(rec, Record)
    _same_record(rec)


DECODE_RECORD = FuzzTarget(
    "records.decode_record",
    lambda raw: decode_record(raw, now=NOW),
    hostile_msgpack(RECORDS, extra=NOT_BYTES),
    (RecordError,),
    count=4_000,
    check=_check_record,
    elsewhere=8_000,  # test_record_fuzz.py: 3,000 random bytes, 2,500 random msgpack, 2,500 mutated records
)

# ----- 2. validators.SignedRecordValidator.validate -----------------------------------------------

VALIDATOR = SignedRecordValidator.for_run(RUN, owner_public=OWNER.public_bytes, clock=lambda: NOW)
SLACK = VALIDATOR.slack


def _entry(raw: bytes, subkey: str, kind: str, expiration: float = EXPIRES) -> tuple:
    return KEY_IDS[kind], MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(raw), expiration


ACCEPTED_ENTRIES = [  # genuine entries the validator must accept
    _entry(PROGRESS, author_subkey(PEER.public_bytes), "progress"),
    _entry(PROGRESS_OTHER, author_subkey(OTHER.public_bytes, "tag.1"), "progress", NOW + 1),
    _entry(PROGRESS_GRACE, author_subkey(PEER.public_bytes), "progress", NOW - 5),
    _entry(MANIFEST, author_subkey(OWNER.public_bytes), "manifest"),
    _entry(TOKEN, author_subkey(OWNER.public_bytes, PEER.public_hex), "token"),
]
REJECTED_ENTRIES = [  # genuine records in the wrong place: the validator must refuse them
    _entry(PROGRESS, author_subkey(OTHER.public_bytes), "progress"),  # someone else's subkey
    _entry(PROGRESS, author_subkey(PEER.public_bytes), "progress", EXPIRES + SLACK + 1),  # DHT expiry too late
    _entry(PROGRESS_ELSEWHERE, author_subkey(PEER.public_bytes), "progress"),  # bound to another run
    _entry(UNBOUND, author_subkey(PEER.public_bytes), "progress"),  # not bound to a key
    _entry(MANIFEST_NOT_OWNER, author_subkey(OTHER.public_bytes), "manifest"),  # not the owner
    _entry(TOKEN_NOT_OWNER, author_subkey(OTHER.public_bytes), "token"),
    _entry(PROGRESS, author_subkey(PEER.public_bytes), "manifest"),  # wrong kind for the key
    _entry(MANIFEST, author_subkey(OWNER.public_bytes), "token"),
    (KEY_IDS["progress"], b"", MSGPackSerializer.dumps(PROGRESS), EXPIRES),  # a plain value (no subkey)
]
ENTRIES = ACCEPTED_ENTRIES + REJECTED_ENTRIES
SUBKEYS = [MSGPackSerializer.dumps(s) for s in (
    author_subkey(PEER.public_bytes), author_subkey(OWNER.public_bytes), author_subkey(OWNER.public_bytes, "x"),
    PEER.public_hex.upper(), PEER.public_hex + ":", PEER.public_hex + ":" + "a" * 129, PEER.public_hex[:-1],
    PEER.public_hex + "\n", "", 0, None, PEER.public_bytes, [PEER.public_hex],
)] + [b"", b"\xc1", b"\xa1", b"\x00" * 300]
OTHER_KEY_IDS = [*KEY_IDS.values(), DHTID.generate(source="unprotected").to_bytes(), b"", b"\x00" * 20, "str", None]
EXPIRATIONS = [EXPIRES, EXPIRES + SLACK, math.nextafter(EXPIRES + SLACK, math.inf), NOW, NOW - SLACK - 1, 0.0, -1.0,
               1e300, math.inf, -math.inf, math.nan, 10**30, "soon", None]
ATTACKS = 9


def _attack(entry: list, mode: int, program: bytes) -> None:
    """Edit one part of a DHT entry [key, subkey, value, expiration] as ``mode`` says."""
    key, subkey, value, expiration = entry
    try:
        inner = msgpack.unpackb(value, raw=False)
    except Exception:  # noqa: BLE001 (an earlier attack broke the wrapper)
        inner = None
    choice = program[0] if program else 0
    if mode == 0 and isinstance(inner, bytes):  # byte edits of the signed record, correctly wrapped
        entry[2] = MSGPackSerializer.dumps(mutate(inner, edit_program(program)))
    elif mode == 1 and inner in RECORD_OBJECTS:  # field edits of the signed record, correctly wrapped
        entry[2] = MSGPackSerializer.dumps(mutate_msgpack(RECORD_OBJECTS[inner], fields_program(program)))
    elif mode == 2:  # edits of the hivemind wrapper around the record
        entry[2] = mutate(value, edit_program(program))
    elif mode == 3:
        entry[1] = mutate(subkey, edit_program(program))
    elif mode == 4:
        entry[1] = SUBKEYS[choice % len(SUBKEYS)]
    elif mode == 5:
        entry[0] = OTHER_KEY_IDS[choice % len(OTHER_KEY_IDS)]
    elif mode == 6:
        entry[3] = EXPIRATIONS[choice % len(EXPIRATIONS)]
    elif mode == 7:  # another genuine record in this entry (a replay under the wrong key or subkey)
        entry[2] = MSGPackSerializer.dumps(RECORDS[choice % len(RECORDS)])
    else:  # random subkey and/or value bytes
        if choice % 2:
            entry[1], entry[2] = SUBKEYS[choice % len(SUBKEYS)], program[1:]
        else:
            entry[1], entry[2] = program[:40], program[40:]


def _dht_record(selector: int, blob: bytes) -> DHTRecord:
    """A genuine entry after one or two attacks (the second one programmed by the blob's tail)."""
    first, index, second, twice = digits(selector, ATTACKS, len(ENTRIES), ATTACKS, 2)
    entry = list(ENTRIES[index])
    _attack(entry, first, blob if first == ATTACKS - 1 else blob[:25])
    if twice:
        _attack(entry, second, blob[25:])
    return DHTRecord(*entry)


def _check_validation(record: DHTRecord, result) -> None:
    assert isinstance(result, bool)
    kind = KIND_OF_KEY_ID.get(record.key) if isinstance(record.key, bytes) else None
    if kind is None:
        assert result is True  # not a protected key: left to hivemind's other validators
        return
    if not result:
        return
    rec = decode_record(msgpack.unpackb(record.value, raw=False), now=NOW - SLACK)
    _same_record(rec)
    assert rec.key == KEYS[kind] and rec.kind == kind
    assert kind == "progress" or rec.author == OWNER.public_bytes
    assert msgpack.unpackb(record.subkey, raw=False)[:64] == rec.author.hex()
    assert math.isfinite(record.expiration_time) and record.expiration_time <= rec.expires + SLACK


VALIDATE = FuzzTarget(
    "validators.SignedRecordValidator.validate",
    VALIDATOR.validate,
    hostile(_dht_record, len(ENTRIES) * ATTACKS * ATTACKS * 2),
    count=8_000,
    check=_check_validation,
    elsewhere=2_500,  # test_record_fuzz.py::test_validator_never_raises
)

# ----- 3. access.check_token ----------------------------------------------------------------------

TOKEN_VALID_FOR = {  # signature -> the one (owner, peer, run) it admits
    decode_record(TOKEN, now=NOW).sig: (OWNER.public_bytes, PEER.public_bytes, RUN),
    decode_record(TOKEN_OTHER_PEER, now=NOW).sig: (OWNER.public_bytes, OTHER.public_bytes, RUN),
    decode_record(TOKEN_OTHER_RUN, now=NOW).sig: (OWNER.public_bytes, PEER.public_bytes, "other"),
    decode_record(TOKEN_NOT_OWNER, now=NOW).sig: (OTHER.public_bytes, PEER.public_bytes, RUN),
}
TOKEN_SEEDS = [TOKEN, TOKEN_OTHER_PEER, TOKEN_OTHER_RUN, TOKEN_NOT_OWNER, TOKEN_KEY_MISMATCH, TOKEN_PEER_AS_HEX,
               PROGRESS, MANIFEST]
TOKEN_BYTES = HostileBytes(TOKEN_SEEDS, structured=True)
OWNERS = [OWNER.public_bytes] * 5 + [OTHER.public_bytes, PEER.public_bytes, b"", b"\x00" * 32]
PEERS = [PEER.public_bytes] * 5 + [OTHER.public_bytes, OWNER.public_bytes, b"", b"\x00" * 32]
RUNS = [RUN] * 5 + ["other", "", "fuzz_tokens", "FUZZ", "x" * 300]


def _token_input(selector: int, blob: bytes) -> tuple[bytes, bytes, bytes, str]:
    """Hostile token bytes, checked for one of several owners, peers and runs (mostly the right ones)."""
    raw, owner, peer, run = digits(selector, TOKEN_BYTES.choices, len(OWNERS), len(PEERS), len(RUNS))
    return TOKEN_BYTES(raw, blob), OWNERS[owner], PEERS[peer], RUNS[run]


def _check_token_input(args) -> None:
    raw, owner, peer, run = args
    return check_token(raw, owner, peer, run, NOW)


def _check_admission(args, result) -> None:
    raw, owner, peer, run = args
    assert result is None
    rec = decode_record(raw, now=NOW)
    _same_record(rec)
    assert TOKEN_VALID_FOR.get(rec.sig) == (owner, peer, run), "token admitted the wrong owner/peer/run"


CHECK_TOKEN = FuzzTarget(
    "access.check_token",
    _check_token_input,
    hostile(_token_input, TOKEN_BYTES.choices * len(OWNERS) * len(PEERS) * len(RUNS)),
    (RecordError,),
    check=_check_admission,
)

# ----- 4. every registered codec's decode -------------------------------------------------------

MAX_NUMEL = 256
FRACTION = 0.1  # topk: decoders must use the sender's fraction (it is in the manifest, not the payload)
EVERY = 4  # rotate: a chunk of 64 (numel 64..256: 1 to 4 chunks, and shorter tensors sent whole)
HADTOPK_CHUNK = 64  # hadtopk: the same chunks (keeping 7 of 64 at FRACTION)


def _codec(name: str, block_size: int = 64):
    """A registered codec by name; ``rotate`` in its default (hadamard) basis, ``rotate-coords`` in the other."""
    basis = "coords" if name == "rotate-coords" else "hadamard"
    return get_codec(CodecConfig(name=name.removesuffix("-coords"), block_size=block_size, topk_chunk=block_size,
                                 topk_fraction=FRACTION, rotate_chunk=max(EVERY, block_size - block_size % EVERY),
                                 rotate_every=EVERY, rotate_basis=basis, hadtopk_chunk=HADTOPK_CHUNK,
                                 hadtopk_fraction=FRACTION))


def _values(numel: int, style: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(numel * 7 + style)
    if style == 0:
        return torch.randn(numel, generator=g)
    if style == 1:
        return torch.zeros(numel)
    if style == 2:  # huge and tiny magnitudes side by side
        return torch.randn(numel, generator=g) * torch.tensor([1e30, 1e-30, 1.0, 6e4]).repeat(numel // 4 + 1)[:numel]
    return torch.randn(numel, generator=g).sign() * torch.finfo(torch.float32).tiny  # smallest normal magnitudes


def _codec_seeds(name: str) -> list[tuple[bytes, int]]:
    seeds = {}
    for i, block_size in enumerate((1, 7, 64, 256, 300)):  # topk, hadtopk, rotate decode only their run's chunk:
        if name.startswith("rotate"):  # their seeds all use it; rotate's cover its phases instead (payloads carry them)
            encoder = _codec(name).for_round(i)
        else:
            encoder = _codec(name, 64 if name in ("topk", "hadtopk") else block_size)
        for numel in (0, 1, 2, 3, 8, 63, 64, 65, 129, 256):
            for style in range(4):
                seeds.setdefault(encoder.encode(_values(numel, style)), numel)
    return sorted(seeds.items(), key=lambda s: (s[1], s[0]))


CODEC_TARGETS = [*codec_names(), "rotate-coords"]
CODECS = {name: _codec(name) for name in CODEC_TARGETS}
CODEC_SEEDS = {name: _codec_seeds(name) for name in CODECS}
NUMEL_DELTAS = [0] * 12 + [1, -1, 2, 64]
CODEC_MODES = ("random", "edit", "edit", "edit", "body")


class CodecInputs:
    """``(selector, blob)`` -> ``(payload, numel)``: random bytes with a random numel, a genuine payload
    after byte edits (numel mostly right), or a genuine header with a random body of the right length."""

    def __init__(self, name: str):
        self.seeds = CODEC_SEEDS[name]
        self.choices = len(CODEC_MODES) * len(self.seeds) * len(NUMEL_DELTAS)

    def __call__(self, selector: int, blob: bytes) -> tuple[bytes, int]:
        mode, seed, delta = digits(selector, len(CODEC_MODES), len(self.seeds), len(NUMEL_DELTAS))
        payload, numel = self.seeds[seed]
        if CODEC_MODES[mode] == "random":
            return random_bytes(blob, seed), selector // 7 % (MAX_NUMEL + 1)
        if CODEC_MODES[mode] == "edit":
            return mutate(payload, edit_program(blob)), max(0, min(MAX_NUMEL, numel + NUMEL_DELTAS[delta]))
        head = HEADER_SIZE if payload[:1] == bytes([MAGIC]) else 0
        body = (blob or b"\0") * (len(payload) // max(1, len(blob)) + 1)
        return payload[:head] + body[: len(payload) - head], numel

    def __repr__(self) -> str:
        return f"CodecInputs(<{len(self.seeds)} seeds>)"


def _check_decoded(args, out) -> None:
    numel = args[1]
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == (numel,)
    assert bool(torch.isfinite(out).all())


def _codec_target(name: str) -> FuzzTarget:
    codec, inputs = CODECS[name], CodecInputs(name)
    return FuzzTarget(f"codec.{name}.decode", lambda args: codec.decode(*args), hostile(inputs, inputs.choices),
                      (CodecError,), check=_check_decoded)


# ----- 5. codec header parsing and the all-reduce part decoder ------------------------------------

HEADER_SEEDS = sorted({(codec_id, numel, block_size) for codec_id in CODEC_IDS.values()
                       for numel in (0, 1, 255, 2**32, 2**64 - 1) for block_size in (1, 256, MAX_BLOCK_SIZE)})


def _header_input(selector: int, blob: bytes) -> tuple[bytes, int, int, str]:
    """A genuine header (plus a few bytes) after byte edits, checked against its own or other
    expectations; or random bytes."""
    mode, seed, pad, expect = digits(selector, 4, len(HEADER_SEEDS), 5, 8)
    codec_id, numel, block_size = HEADER_SEEDS[seed]
    if mode == 0:
        return random_bytes(blob, seed), [codec_id, 0, 255][pad % 3], [numel, 0, 2**64 - 1][expect % 3], "fuzz"
    payload = mutate(pack_header(codec_id, numel, block_size) + bytes(pad), edit_program(blob))
    expect_id = codec_id if expect & 3 else selector % 7
    expect_numel = numel if expect & 4 else (numel + 1) % 2**64
    return payload, expect_id, expect_numel, "fuzz"


def _check_header(args, block_size) -> None:
    payload, codec_id, numel, _ = args
    assert isinstance(block_size, int) and 1 <= block_size <= MAX_BLOCK_SIZE
    assert HEADER.unpack_from(payload)[2:] == (codec_id, 0, numel, block_size)


READ_HEADER = FuzzTarget(
    "header.read_header",
    lambda args: read_header(*args),
    hostile(_header_input, 4 * len(HEADER_SEEDS) * 5 * 8, max_size=48),
    (CodecError,),
    check=_check_header,
)

PART_SEEDS = [(name, payload, numel) for name in CODECS for payload, numel in CODEC_SEEDS[name][::3]]
NAMES = sorted(CODECS)


def _part_input(selector: int, blob: bytes):
    """A hivemind tensor message as a peer could send it, with the codec and part size we expect:
    the blob's first 25 bytes may edit the payload, the rest the serialized message."""
    edits, seed, sel = digits(selector, 4, len(PART_SEEDS), 2048)
    name, payload, numel = PART_SEEDS[seed]
    program = edit_program(blob[:25]) if edits & 1 else b""
    wire_program = edit_program(blob[25:]) if edits & 2 else b""
    tag = TAG_PREFIX + CODECS[name].info.name  # (rotate-coords is tagged rotate: the manifests differ)
    dtype = [tag, tag, tag, tag, tag, TAG_PREFIX + NAMES[sel % len(NAMES)], "", tag.upper()][sel & 7]
    size = [[numel], [numel], [1, numel], [numel, 1, 1], [numel + 1], [], [1] * 8 + [numel], [2**31, 2**31],
            [2**32 - 1] * 4, [0], [numel, 0], [0, 2**32 - 1]][(sel >> 3) % 12]  # size is repeated uint32
    message = runtime_pb2.Tensor(buffer=mutate(payload, program), size=size, dtype=dtype, requires_grad=bool(sel & 1),
                                 compression=runtime_pb2.CompressionType.NONE)
    if wire_program:  # edit the serialized message; whatever protobuf still parses is what a peer can send
        try:
            message = runtime_pb2.Tensor.FromString(mutate(message.SerializeToString(), wire_program))
        except Exception:  # noqa: BLE001 (protobuf's DecodeError: rejected before decode_part is reached)
            pass
    codec = CODECS[NAMES[(sel >> 7) % len(NAMES)]] if sel & 0x300 == 0x300 else CODECS[name]  # 1/4: another codec
    expected = numel + 1 if sel & 0x600 == 0x600 else numel
    return message, codec, expected


def _check_part(args, out) -> None:
    message, codec, expected = args
    assert message.dtype == TAG_PREFIX + codec.info.name
    assert math.prod(message.size) == expected
    _check_decoded((None, expected), out)


DECODE_PART = FuzzTarget(
    "hivemind_bridge.decode_part",
    lambda args: decode_part(*args),
    hostile(_part_input, 4 * 2048 * len(PART_SEEDS), max_size=64),
    (CodecError,),
    check=_check_part,
)

# ----- what a peer reads from the run's DHT keys (signed heartbeats, manifests, tokens, directory) -----

RUN_MANIFEST = RunManifest.from_dict({"run_id": RUN, "seed": 0, "access": {"owner": OWNER.public_hex, "private": True}})
BEAT = PeerProgress(peer_id=PEER.libp2p_peer_id(), outer_step=4, state="ready", time=NOW, samples=64,
                    maddrs=("/ip4/1.2.3.4/tcp/5",), digest="00ff00ff00ff00ff", extra={"gpu": "h100"},
                    attest=((2, b"\x01" * 64), (3, b"\x02" * 64)), attempt=1, rerun="broken",
                    suspects=(OTHER.libp2p_peer_id(),))
HEARTBEATS = [encode_record("progress", BEAT.to_dict(), PEER, EXPIRES, key=RUN_MANIFEST.progress_key),
              encode_record("progress", {**BEAT.to_dict(), "peer_id": OTHER.libp2p_peer_id()}, PEER, EXPIRES,
                            key=RUN_MANIFEST.progress_key)]  # claims someone else's peer id


def _check_heartbeat(raw, result) -> None:
    progress, author = result
    assert author == PEER.public_bytes and progress.peer_id == PEER.libp2p_peer_id()
    assert progress.state in STATES and math.isfinite(progress.time) and progress.outer_step >= 0


READ_PROGRESS = FuzzTarget(
    "progress.read_progress",
    lambda raw: read_progress(raw, key=RUN_MANIFEST.progress_key, subkey=PEER.public_hex, now=NOW),
    hostile_msgpack(HEARTBEATS), (RecordError,), check=_check_heartbeat,
)
SIGNED_MANIFESTS = [sign_manifest(RUN_MANIFEST, OWNER, EXPIRES), sign_manifest(RUN_MANIFEST, OTHER, EXPIRES)]


def _check_manifest(raw, result) -> None:
    if result is not None:
        assert result.manifest.hash == RUN_MANIFEST.hash and result.author == OWNER.public_bytes and result.by_owner


READ_MANIFEST = FuzzTarget(
    "manifest.read_manifest", lambda raw: read_manifest(raw, run_id=RUN, subkey=OWNER.public_hex, now=NOW),
    hostile_msgpack(SIGNED_MANIFESTS), (), check=_check_manifest,
)


def _check_tokens(raw, result) -> None:
    assert set(result) <= {PEER.public_bytes}


READ_TOKENS = FuzzTarget(
    "access.read_tokens",
    lambda raw: read_tokens({token_subkey(OWNER.public_bytes, PEER.public_bytes): raw}, OWNER.public_bytes, RUN, NOW),
    hostile_msgpack([TOKEN, TOKEN_OTHER_PEER, TOKEN_NOT_OWNER]), (), check=_check_tokens,
)
READ_INDEX = FuzzTarget(
    "manifest.read_index", lambda raw: read_index({PEER.public_hex: raw}, NOW),
    hostile_msgpack([sign_index_entry(RUN_MANIFEST, PEER, EXPIRES)]), (),
    check=lambda raw, result: all(isinstance(r, str) and isinstance(o, str) for r, o in result),
)
PEER_IDS = [bytes.fromhex("0024080112") + b"\x20" + PEER.public_bytes, PEER.libp2p_peer_id().encode()]


def _peer_key(raw: bytes):
    """Both forms a peer id arrives in: multihash bytes (from libp2p) and base58 text (from records)."""
    return public_key_of_peer_id(raw), public_key_of_peer_id(raw.decode("latin-1"))


PEER_ID_KEY = FuzzTarget(
    "identity.public_key_of_peer_id", _peer_key, hostile_bytes(PEER_IDS), (),
    check=lambda raw, keys: all(k is None or len(k) == 32 for k in keys),
)
RUN_SPEC = FuzzTarget(
    "joining.RunSpec.parse", lambda raw: RunSpec.parse(raw.decode("utf-8", "replace")),
    hostile_bytes([f"{RUN}@{OWNER.public_hex}".encode(), b"run-1", b"a@b"]), (JoinError,),
)

# ----- certificates of committed rounds (lineage proofs a peer downloads, checkpoints it resumes) ----

ROUND = RoundHeader(manifest=RUN_MANIFEST.hash, step=3, parent=bytes(32), digest=b"\x07" * 32,
                    members=tuple(sorted((PEER.public_bytes, OTHER.public_bytes))), samples=128)
CERT = sign_round(ROUND, PEER).with_signature(OTHER.public_bytes, OTHER.sign(ROUND.payload()))
CERT_SEEDS = [CERT.encode(), sign_round(ROUND, OTHER).encode(), Certificate(ROUND, ()).encode()]


def _check_certificate(raw, cert) -> None:
    """Anything accepted re-encodes to what it says, and counts only genuine signatures."""
    assert Certificate.decode(cert.encode()) == cert
    assert cert.signers() <= ({PEER.public_bytes, OTHER.public_bytes} if cert.header == ROUND else set())


DECODE_CERTIFICATE = FuzzTarget(
    "certificates.Certificate.decode", Certificate.decode, hostile_msgpack(CERT_SEEDS), (CertificateError,),
    check=_check_certificate,
)


def _proof_chain(raw: bytes) -> Chain:
    """A proof as the catch-up reads it: certificates from a point of our chain, checked link by link."""
    chain = Chain(RUN_MANIFEST.hash, 3, bytes(32))
    certs = [Certificate.decode(raw)]
    check_segment(certs, start_step=3, start_digest=bytes(32), manifest=RUN_MANIFEST.hash)
    return chain.extended(3, certs)


PROOF_CHAIN = FuzzTarget(
    "lineage.proof_chain", _proof_chain, hostile_msgpack(CERT_SEEDS), (CertificateError,),
    check=lambda raw, chain: chain.tip_digest == b"\x07" * 32 and chain.certs[0].signers(),
)

# ----- the fuzz set ---------------------------------------------------------------------------------

TARGETS: list[FuzzTarget] = [
    DECODE_RECORD,
    VALIDATE,
    CHECK_TOKEN,
    *(_codec_target(name) for name in CODEC_TARGETS),
    READ_HEADER,
    DECODE_PART,
    READ_PROGRESS,
    READ_MANIFEST,
    READ_TOKENS,
    READ_INDEX,
    PEER_ID_KEY,
    RUN_SPEC,
    DECODE_CERTIFICATE,
    PROOF_CHAIN,
]


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_decoder_is_total(target: FuzzTarget):
    fed = run_target(target)
    if SCALE >= 1:
        assert fed >= target.count


def test_every_target_gets_enough_inputs():
    names = [t.name for t in TARGETS]
    assert len(set(names)) == len(names)
    assert {f"codec.{name}.decode" for name in codec_names()} <= set(names), "a registered codec is not fuzzed"
    short = {t.name: t.count + t.elsewhere for t in TARGETS if t.count + t.elsewhere < REQUIRED_INPUTS}
    assert not short, f"fewer than {REQUIRED_INPUTS} fuzz inputs: {short}"


# ----- oracle sanity: the genuine inputs pass, so the properties above are not vacuous ---------------

def test_genuine_inputs_are_accepted():
    for raw in RECORDS[:2] + [MANIFEST, TOKEN]:
        _check_record(raw, decode_record(raw, now=NOW))
    for entry in ACCEPTED_ENTRIES:
        record = DHTRecord(*entry)
        assert VALIDATOR.validate(record) is True
        _check_validation(record, True)
    for entry in REJECTED_ENTRIES:
        assert VALIDATOR.validate(DHTRecord(*entry)) is False
    for raw in TOKEN_SEEDS:
        sig = decode_record(raw, now=NOW).sig
        if sig in TOKEN_VALID_FOR:
            args = (raw, *TOKEN_VALID_FOR[sig])
            _check_admission(args, _check_token_input(args))
    with pytest.raises(RecordError):
        check_token(TOKEN, OWNER.public_bytes, OTHER.public_bytes, RUN, NOW)
    for name, codec in CODECS.items():
        for payload, numel in CODEC_SEEDS[name]:
            _check_decoded((payload, numel), codec.decode(payload, numel))
    for seed in HEADER_SEEDS:
        args = (pack_header(*seed), seed[0], seed[1], "fuzz")
        _check_header(args, read_header(*args))
    for index in range(len(PART_SEEDS)):
        args = _part_input(index * 4, b"")
        _check_part(args, decode_part(*args))
    _check_heartbeat(HEARTBEATS[0], READ_PROGRESS.call(HEARTBEATS[0]))
    with pytest.raises(RecordError, match="peer id"):
        READ_PROGRESS.call(HEARTBEATS[1])
    assert READ_MANIFEST.call(SIGNED_MANIFESTS[0]).by_owner and READ_MANIFEST.call(SIGNED_MANIFESTS[1]) is None
    assert READ_TOKENS.call(TOKEN) == {PEER.public_bytes: EXPIRES} and READ_TOKENS.call(TOKEN_NOT_OWNER) == {}
    assert READ_INDEX.call(sign_index_entry(RUN_MANIFEST, PEER, EXPIRES)) == [(RUN, OWNER.public_hex)]
    assert _peer_key(PEER_IDS[0])[0] == PEER.public_bytes and _peer_key(PEER_IDS[1])[1] == PEER.public_bytes


def test_mutation_programs_are_total():
    """The generators themselves: any program is valid, and the empty one changes nothing."""
    assert mutate(PROGRESS, b"") == PROGRESS
    assert msgpack.unpackb(mutate_msgpack(RECORD_OBJECTS[PROGRESS], b""), raw=False) == RECORD_OBJECTS[PROGRESS]
    for i in range(512):
        program = bytes((i * 37 + j * 101 + (i * j) % 7) % 256 for j in range(i % 29))
        mutate(PROGRESS, program)
        mutate_msgpack(RECORD_OBJECTS[MANIFEST], program)
