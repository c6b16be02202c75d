"""The sparse all-gather's rules without a network: who dials whom, what a payload must be, the sum."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.proto import averaging_pb2, runtime_pb2

from swarmloco.compression import get_codec
from swarmloco.compression.base import CodecError
from swarmloco.config import CodecConfig
from swarmloco.protocol.allgather import CHUNK_BYTES, SparseAllGatherRunner
from swarmloco.protocol.errors import PartialAllReduce

CODEC = get_codec(CodecConfig(name="topk", topk_chunk=64, topk_fraction=0.1))


class PeerId(str):
    def to_base58(self) -> str:
        return str(self)


class P2P:
    def __init__(self, me: str):
        self.peer_id = PeerId(me)


@pytest.fixture(autouse=True)
def loop():
    """Runners are built inside the averager's event loop: here, one loop per test."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


def runner(me: int = 0, n: int = 3, dialable=None, numel: int = 1000, timeout: float = 0.5) -> SparseAllGatherRunner:
    peers = [PeerId(f"peer{i}") for i in range(n)]
    r = SparseAllGatherRunner(codec=CODEC, p2p=P2P(f"peer{me}"), servicer_type=None, prefix="x", group_id=b"g",
                              ordered_peer_ids=peers, dialable=dialable or [True] * n,
                              tensors=[torch.randn(numel)], weight=2.0, timeout=timeout)
    r.payload = CODEC.encode(r._tensors[0])
    r._lengths = [len(r.payload)]
    return r


async def stream_of(*messages):
    for m in messages:
        yield m


def message(payload: bytes, size=None, tag="swarmloco/topk", weight=1.0, code=averaging_pb2.PART_FOR_AVERAGING):
    part = runtime_pb2.Tensor(buffer=payload, dtype=tag, size=[len(payload)] if size is None else size)
    return averaging_pb2.AveragingData(code=code, group_id=b"g", weight=weight, tensor_part=part)


def read(r: SparseAllGatherRunner, *messages):
    return asyncio.get_event_loop().run_until_complete(r._read_payload(stream_of(*messages)))


def test_exactly_one_member_of_each_pair_dials() -> None:
    r = runner(n=4, dialable=[True, False, True, False])
    for i in range(4):
        for j in range(4):
            if i != j:
                assert r.dials(i, j) != r.dials(j, i)
    assert r.dials(1, 0) and r.dials(0, 2) and r.dials(3, 2)  # a client-mode member dials a public one


def test_a_payload_split_over_messages_is_reassembled() -> None:
    r = runner(numel=4_000_000)
    other = CODEC.encode(torch.randn(4_000_000))
    assert len(other) > CHUNK_BYTES
    parts = [other[i: i + CHUNK_BYTES] for i in range(0, len(other), CHUNK_BYTES)]
    msgs = [message(parts[0], size=[len(other)])] + [message(p, size=[]) for p in parts[1:]]
    assert read(r, *msgs) == (1.0, other)


@pytest.mark.parametrize("bad, reason", [
    (lambda p: message(p, tag="swarmloco/int8"), "encoded as"),
    (lambda p: message(p, size=[len(p) + 1]), "bytes"),
    (lambda p: message(p[:-3], size=[len(p)]), "truncated"),
    (lambda p: message(p, weight=float("nan")), "invalid weight"),
    (lambda p: message(p, weight=-1.0), "invalid weight"),
    (lambda p: message(p, code=averaging_pb2.INTERNAL_ERROR), "INTERNAL_ERROR"),
])
def test_a_hostile_payload_is_rejected_with_a_reason(bad, reason) -> None:
    r = runner()
    with pytest.raises(Exception, match=reason):
        read(r, bad(r.payload))


def test_garbage_of_the_right_length_fails_to_decode() -> None:
    r = runner()
    junk = bytes(len(r.payload))
    with pytest.raises(CodecError):
        CODEC.decode(junk, r.numel)


def test_the_average_is_weighted_over_each_coordinates_senders_and_in_the_groups_order() -> None:
    r = runner()
    xs = [torch.randn(1000) for _ in range(3)]
    contributions = {i: (float(i + 1), CODEC.encode(x)) for i, x in enumerate(xs)}
    got = r._average(contributions)
    sent = [CODEC.roundtrip(x) for x in xs]
    weights = sum((s != 0).float() * (i + 1) for i, s in enumerate(sent))  # per coordinate: its senders' weights
    want = torch.where(weights > 0, sum(s * (i + 1) for i, s in enumerate(sent)) / weights.clamp_min(1), 0.0)
    assert torch.allclose(got, want, atol=1e-6)
    only = (sent[0] != 0) & (sent[1] == 0) & (sent[2] == 0)
    assert bool(only.any()) and torch.equal(got[only], sent[0][only])  # sent by one member: its value, whole
    assert bool((weights == 0).any()) and not bool(got[weights == 0].any())  # sent by none: 0
    assert torch.equal(got, r._average(dict(reversed(contributions.items()))))  # arrival order does not matter


@pytest.mark.parametrize("cfg", [CodecConfig(name="rotate", rotate_chunk=64),
                                 CodecConfig(name="hadtopk", hadtopk_chunk=64, hadtopk_fraction=0.1)],
                         ids=["rotate-hadamard", "hadtopk"])
def test_turned_payloads_are_averaged_over_the_group_and_turned_back_once(cfg) -> None:
    """Dense decoded payloads (a turned-back value can cancel to exactly 0): the plain weighted mean over the
    whole group, computed on the coefficients and turned back once per tensor: the mean of the decoded
    payloads up to float rounding, the same bits whatever the arrival order. (hadtopk: each member sends its
    own coefficients; one another member did not send counts as 0 from it, as in dense averaging.)"""
    codec = get_codec(cfg).for_round(3)
    tensors = [torch.randn(200), torch.randn(40)]  # 3 whole chunks and a tail; one tensor shorter than a chunk
    r = SparseAllGatherRunner(codec=codec, p2p=P2P("peer0"), servicer_type=None, prefix="x", group_id=b"g",
                              ordered_peer_ids=[PeerId(f"peer{i}") for i in range(3)], dialable=[True] * 3,
                              tensors=tensors, weight=1.0, timeout=0.5)
    r._lengths = [codec.payload_size(t.numel()) for t in tensors]
    xs = [[torch.randn(t.numel()) for t in tensors] for _ in range(3)]
    contributions = {i: (float(i + 1), b"".join(codec.encode(t) for t in x)) for i, x in enumerate(xs)}
    got = r._average(contributions)
    decoded = [torch.cat([codec.roundtrip(t) for t in x]) for x in xs]
    assert bool((decoded[0] == 0).any())  # a member "sent nothing" there: the mean over senders would skip it
    want = sum(d * (i + 1) for i, d in enumerate(decoded)) / 6
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(got, r._average(dict(reversed(contributions.items()))))


def test_a_member_that_never_dials_fails_the_round_by_its_deadline() -> None:
    r = runner(me=2, n=3, timeout=0.2)  # members 0 and 1 should dial member 2; neither does

    with pytest.raises(PartialAllReduce, match="1 of 3 contributions.*timed out"):
        asyncio.get_event_loop().run_until_complete(asyncio.wait_for(r.run(), 5))


def test_each_tensor_is_encoded_on_its_own_as_error_feedback_assumes() -> None:
    tensors = [torch.randn(100), torch.randn(7, 9), torch.randn(300)]
    r = SparseAllGatherRunner(codec=CODEC, p2p=P2P("peer0"), servicer_type=None, prefix="x", group_id=b"g",
                              ordered_peer_ids=[PeerId("peer0"), PeerId("peer1")], dialable=[True, True],
                              tensors=tensors, weight=1.0, timeout=0.5)
    parts = [CODEC.encode(t.reshape(-1)) for t in tensors]
    r._lengths = [len(p) for p in parts]
    want = torch.cat([CODEC.roundtrip(t).reshape(-1) for t in tensors])
    assert torch.equal(r.decode(b"".join(parts)), want)
