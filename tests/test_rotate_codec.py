"""The rotate codec: which coordinates a round sends, their 1-bit values and per-chunk levels, the exact
payload layout, strict decoding of hostile payloads, and the config checks that go with it."""

from __future__ import annotations

import struct

import pytest
import torch

from swarmloco.compression import CodecError, get_codec
from swarmloco.compression.header import HEADER_SIZE
from swarmloco.compression.rotate import RotateCodec
from swarmloco.config import CodecConfig, ConfigError, InnerConfig, OuterConfig, RunConfig

PHASE_AT = HEADER_SIZE  # u32 phase right after the header
LEVELS_AT = HEADER_SIZE + 4


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _patch(p: bytes, offset: int, raw: bytes) -> bytes:
    return p[:offset] + raw + p[offset + len(raw):]


def reference(x: torch.Tensor, chunk: int, every: int, phase: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sent mask, decoded values) computed value by value from the documented semantics."""
    n = x.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    rows = [(0, n, 0, 1)] if 0 < n < chunk else [
        (start, min(chunk, n - start), (phase + c) % every, every) for c, start in enumerate(range(0, n, chunk))]
    out = torch.zeros(n)
    for start, length, off, step in rows:
        idx = list(range(start + off, start + length, step))
        mask[idx] = True
        sent = x[idx]
        level = sent.abs().double().mean().to(torch.bfloat16).float() if idx else torch.tensor(0.0)
        out[idx] = torch.where(sent < 0, -level, level)
    return mask, out


# ---------------------------------------------------------------- what a round sends


def test_mask_of_a_small_tensor_by_hand():
    """chunk 8, every 4, 20 values, phase 1: chunk 0 from offset 1, chunk 1 from 2, the 4-value tail from 3."""
    c = RotateCodec(chunk=8, every=4).for_round(1)
    assert c.sent_mask(20).nonzero().flatten().tolist() == [1, 5, 10, 14, 19]
    assert c.sent_count(20) == 5
    y = c.decode(c.encode(torch.arange(1.0, 21.0)), 20)
    assert y.nonzero().flatten().tolist() == [1, 5, 10, 14, 19]


@pytest.mark.parametrize("chunk,every,n", [(8, 4, 37), (8, 4, 34), (12, 4, 40), (6, 3, 20), (4, 4, 4), (1, 1, 5)])
def test_roundtrip_is_sign_times_chunk_mean_on_the_mask_and_zero_off_it(chunk, every, n):
    x = torch.randn(n, generator=gen(n))
    x[0], x[n // 2] = 0.0, -0.0  # zeros (either sign) are sent as +level
    for phase in range(every):
        c = RotateCodec(chunk, every).for_round(phase)
        y = c.decode(c.encode(x), n)
        mask, expected = reference(x, chunk, every, phase)
        assert torch.equal(c.sent_mask(n), mask) and c.sent_count(n) == int(mask.sum())
        assert torch.equal(y[~mask], torch.zeros(int((~mask).sum())))  # exactly 0 off the mask
        assert torch.equal(y, expected)  # +-bf16(mean |sent|) of its chunk on it, with the input's sign
        assert not bool(torch.signbit(y[[i for i in (0, n // 2) if mask[i]]]).any())  # zeros: +level, never -


def test_zero_inputs_decode_to_plus_the_level():
    c = RotateCodec(chunk=4, every=4)
    x = torch.tensor([0.0, 9.0, 9.0, 9.0, -0.0, 9.0, 9.0, 9.0, -2.0, 9.0, 9.0, 9.0])  # phase 0: sends 0, 5, 10
    x[5], x[10] = -3.0, 5.0
    y = c.decode(c.encode(x), 12)
    assert y.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, -3.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0]  # a zero alone: level 0
    x = torch.tensor([0.0, 0.0, -0.0, 0.0, 4.0, -4.0, 0.0, 0.0])  # 8 values < chunk 16: one level, 8 / 8
    y = RotateCodec(chunk=16, every=4).roundtrip(x)
    assert y.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0, 1.0]


@pytest.mark.parametrize("chunk,every,n", [(8, 4, 37), (8, 4, 34), (8, 4, 33), (12, 4, 41), (6, 3, 20),
                                           (4, 4, 4), (1, 1, 5), (8, 8, 70)])
def test_every_coordinate_is_sent_once_over_every_consecutive_rounds(chunk, every, n):
    """Also for a last partial chunk and a tail shorter than ``every`` (34, 33: tails of 2 and 1 values)."""
    codec = RotateCodec(chunk, every)
    x = torch.randn(n, generator=gen()).abs() + 1  # nonzero levels: decoded nonzeros are the sent values
    for first in (0, 1, every + 2, 7):
        masks = [codec.for_round(step).sent_mask(n) for step in range(first, first + every)]
        assert torch.equal(torch.stack(masks).sum(0), torch.ones(n, dtype=torch.int64))
        decoded = [codec.for_round(step).roundtrip(x) != 0 for step in range(first, first + every)]
        assert torch.equal(torch.stack(decoded).sum(0), torch.ones(n, dtype=torch.int64))


def test_for_round_sets_the_phase_on_a_copy():
    c = RotateCodec(chunk=8, every=4)
    assert [c.for_round(s).phase for s in (0, 1, 2, 3, 4, 9, 4003)] == [0, 1, 2, 3, 0, 1, 3]
    assert c.phase is None and c.for_round(3) is not c  # (unbound: encodes phase 0, decodes any)
    assert get_codec(CodecConfig(name="none")).for_round(3).info.name == "none"  # other codecs: themselves


@pytest.mark.parametrize("n", [1, 2, 5, 63])
def test_tensors_shorter_than_a_chunk_are_sent_whole_in_every_phase(n):
    x = torch.randn(n, generator=gen(n))
    level = float(x.abs().double().mean().to(torch.bfloat16))
    for phase in range(4):
        c = RotateCodec(chunk=64, every=4).for_round(phase)
        assert bool(c.sent_mask(n).all()) and c.sent_count(n) == n
        assert c.payload_size(n) == HEADER_SIZE + 4 + 2 + (n + 7) // 8  # one level, one bit per value
        y = c.roundtrip(x)
        assert torch.equal(y, torch.where(x < 0, -level, level))
    assert RotateCodec(chunk=64, every=4).sent_count(64) == 16  # a whole chunk is no longer sent whole


def test_payload_length_is_payload_size_for_many_sizes_and_phases():
    for chunk, every in ((8, 4), (12, 4), (4, 4), (6, 3), (1, 1), (16, 16)):
        base = RotateCodec(chunk, every)
        for n in list(range(0, 70)) + [255, 256, 257, 1000]:
            x = torch.randn(n, generator=gen(n))
            for phase in range(every):
                c = base.for_round(phase)
                rows = -(-n // chunk)
                expected = HEADER_SIZE + 4 + 2 * rows + (c.sent_count(n) + 7) // 8
                assert len(c.encode(x)) == c.payload_size(n) == base.payload_size(n, phase) == expected


def test_bits_per_value_at_4096_every_4():
    c = get_codec(CodecConfig(name="rotate"))
    assert isinstance(c, RotateCodec) and (c.chunk, c.every, c.phase) == (4096, 4, None)
    assert c.info.name == "rotate" and c.info.summable is False
    assert c.info.bits_per_value == (1024 + 16) / 4096  # one bit for 1 in 4 values, a bf16 level per chunk
    n = 1 << 20
    size = len(c.encode(torch.randn(n, generator=gen())))
    assert size == HEADER_SIZE + 4 + 2 * 256 + n // 32
    assert 8 * size / n == pytest.approx(c.info.bits_per_value, rel=1e-3)
    assert 125 < 4 * n / size < 127  # ~126x below fp32
    assert c.expected_ratio() == pytest.approx(size / (4 * n), rel=1e-3)


def test_decode_reads_the_phase_from_the_payload():
    n = 37
    x = torch.randn(n, generator=gen())
    sender = RotateCodec(chunk=8, every=4).for_round(3)
    p = sender.encode(x)
    assert struct.unpack_from("<I", p, PHASE_AT) == (3,)
    expected = reference(x, 8, 4, 3)[1]
    for receiver in (RotateCodec(chunk=8, every=4), RotateCodec(chunk=8, every=4).for_round(7), sender):
        assert torch.equal(receiver.decode(p, n), expected)
    assert not torch.equal(sender.sent_mask(n), RotateCodec(8, 4).sent_mask(n))  # the phases send other values


def test_a_codec_bound_to_a_round_refuses_another_rounds_phase():
    """Every member of a round is at the same outer step: a payload for another phase (a confused or hostile
    peer, whose values would land on coordinates nobody else sent) is refused by the round's decoder."""
    n = 37
    p = RotateCodec(chunk=8, every=4).for_round(2).encode(torch.randn(n, generator=gen()))
    for step in (0, 1, 3, 5):
        with pytest.raises(CodecError, match="phase 2, this round's is"):
            RotateCodec(chunk=8, every=4).for_round(step).decode(p, n)


# ---------------------------------------------------------------- hostile payloads

N = 37  # chunk 8: 4 full chunks (2 values each) and a 5-value tail (1 value at phase 1): 9 bits, 7 padding


def _codec() -> RotateCodec:
    return RotateCodec(chunk=8, every=4).for_round(1)


def _valid() -> bytes:
    return _codec().encode(torch.randn(N, generator=gen()))


def reject(payload: bytes, numel: int = N, match: str | None = None, codec: RotateCodec | None = None) -> None:
    with pytest.raises(CodecError, match=match):
        (codec or RotateCodec(chunk=8, every=4)).decode(payload, numel)


def test_hostile_payload_fixture_is_accepted_as_is():
    p = _valid()
    assert _codec().sent_count(N) == 9 and len(p) == HEADER_SIZE + 4 + 2 * 5 + 2  # 9 bits: 7 padding bits
    assert RotateCodec(chunk=8, every=4).decode(p, N).count_nonzero() == 9


def test_phase_at_or_above_every_is_refused():
    p = _valid()
    for phase in (4, 5, 255, 2**31, 2**32 - 1):
        reject(_patch(p, PHASE_AT, struct.pack("<I", phase)), match="phase")
    q = _codec().encode(torch.randn(33, generator=gen()))  # 33 values: 8 sent at phase 1, 9 at phase 0
    assert len(q) == RotateCodec(8, 4).payload_size(33, 1) == RotateCodec(8, 4).payload_size(33, 0) - 1
    reject(_patch(q, PHASE_AT, struct.pack("<I", 0)), 33, match="bytes")  # a valid phase, the wrong length


def test_truncated_and_extended_payloads_are_refused():
    p = _valid()
    for bad in (b"", p[:1], p[:HEADER_SIZE], p[:HEADER_SIZE + 3], p[:HEADER_SIZE + 4], p[:-1], p + b"\0", p + p):
        reject(bad)


def test_wrong_codec_and_wrong_chunk_are_refused():
    p = _valid()
    reject(_patch(p, 2, b"\x06"))  # topk's codec id
    reject(get_codec(CodecConfig(name="topk", topk_chunk=8)).encode(torch.randn(N, generator=gen())))
    reject(get_codec(CodecConfig(name="int8")).encode(torch.randn(N, generator=gen())))
    reject(RotateCodec(chunk=16, every=4).encode(torch.randn(N, generator=gen())), match="chunks of 16")
    for chunk in (0, 4, 12, 65537):
        reject(_patch(p, 12, struct.pack("<I", chunk)))
    reject(p, codec=RotateCodec(chunk=8, every=8))  # another every: phase 1 sends other values, other length


@pytest.mark.parametrize("level", [b"\xc0\x7f", b"\x80\x7f", b"\x80\xff", b"\x80\xbf", b"\x01\x80"],
                         ids=["nan", "inf", "-inf", "-1", "-subnormal"])
@pytest.mark.parametrize("row", [0, 4])
def test_nan_inf_and_negative_levels_are_refused(level, row):
    reject(_patch(_valid(), LEVELS_AT + 2 * row, level), match="level")


def test_nonzero_padding_bits_are_refused():
    p = _valid()
    assert RotateCodec(chunk=8, every=4).decode(_patch(p, len(p) - 1, bytes([p[-1] | 0x01])), N) is not None
    for bit in range(1, 8):
        reject(_patch(p, len(p) - 1, bytes([p[-1] | 1 << bit])), match="padding")


def test_wrong_numel_is_refused():
    p = _valid()
    for numel in (0, 1, N - 1, N + 1, 2**40):
        reject(p, numel)


def test_encode_refuses_nan_and_inf_sent_or_not():
    c = RotateCodec(chunk=8, every=4)
    for bad in (float("nan"), float("inf"), -float("inf"), 3.0e38):
        for at in (0, 1):  # phase 0 sends coordinate 0 of the first chunk, not 1
            for n in (5, 37):
                x = torch.zeros(n)
                x[at] = bad
                with pytest.raises(CodecError):
                    c.encode(x)
    assert c.encode(torch.full((37,), 1.0e38)) is not None  # large but encodable


# ---------------------------------------------------------------- config


def test_codec_config_checks_rotate_settings():
    assert issubclass(ConfigError, ValueError)
    assert get_codec(CodecConfig(name="rotate", rotate_chunk=256, rotate_every=256)).chunk == 256
    assert get_codec(CodecConfig(name="rotate", rotate_chunk=12, rotate_every=3, rotate_basis="coords")).every == 3
    assert get_codec(CodecConfig(name="rotate")).basis == "hadamard"  # the default
    with pytest.raises(ConfigError, match=r"rotate_chunk = 12 .*power of two"):
        CodecConfig(name="rotate", rotate_chunk=12, rotate_every=3)  # the hadamard basis turns 2^k values
    assert CodecConfig(name="int8", rotate_chunk=12, rotate_every=3).rotate_chunk == 12  # (rotate unused)
    with pytest.raises(ConfigError, match="rotate_basis"):
        CodecConfig(name="rotate", rotate_basis="fourier")
    for kw, field in ((dict(rotate_chunk=4098, rotate_every=4), "rotate_chunk"),
                      (dict(rotate_chunk=6, rotate_every=4), "rotate_chunk"),
                      (dict(rotate_chunk=2, rotate_every=4), "rotate_chunk"),
                      (dict(rotate_chunk=65540, rotate_every=4), "rotate_chunk"),
                      (dict(rotate_every=0), "rotate_every"),
                      (dict(rotate_every=257, rotate_chunk=257 * 4), "rotate_every"),
                      (dict(rotate_every=True), "rotate_every")):
        with pytest.raises(ConfigError, match=field):
            CodecConfig(name="rotate", **kw)
    with pytest.raises(ConfigError, match="error_feedback"):
        CodecConfig(name="rotate", error_feedback=False)
    assert CodecConfig(name="topk", error_feedback=False).error_feedback is False  # other codecs may turn it off
    with pytest.raises(ValueError, match="rotate_chunk"):
        RotateCodec(chunk=6, every=4)
    with pytest.raises(ValueError, match="rotate_chunk"):
        RotateCodec(chunk=12, every=4, basis="hadamard")
    with pytest.raises(ValueError, match="rotate_basis"):
        RotateCodec(chunk=8, every=4, basis="fourier")


@pytest.mark.parametrize("outer", [OuterConfig(overlap="delayed"), OuterConfig(overlap="eager"),
                                   OuterConfig(fragments=2)], ids=["delayed", "eager", "fragments"])
def test_run_config_refuses_rotate_with_overlap_or_fragments(outer):
    inner = InnerConfig(steps=50)  # a multiple of fragments: only the codec can refuse it
    RunConfig(codec=CodecConfig(name="topk"), inner=inner, outer=outer)
    with pytest.raises(ConfigError, match=r"outer\.(overlap|fragments)"):
        RunConfig(codec=CodecConfig(name="rotate"), inner=inner, outer=outer)
    RunConfig(codec=CodecConfig(name="rotate"), inner=inner)  # with the default outer settings it runs


# ---------------------------------------------------------------- the hadamard basis


def test_hadamard_rotation_is_the_signed_sylvester_matrix_and_keeps_norms():
    """rotate(x) = (d * x) @ H / sqrt(n) with H Sylvester's and d the documented SHAKE-128 signs; unrotate
    inverts it; both refuse a row length that is not a power of two."""
    from swarmloco.compression import hadamard

    assert hadamard.signs(16).tolist() == [1, 1, 1, 1, 1, -1, 1, 1, -1, 1, -1, -1, 1, 1, -1, 1]  # known answer
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < 64:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(5, 64, generator=gen(3))
    want = (x.double() * hadamard.signs(64).double()) @ h / 8
    torch.testing.assert_close(hadamard.rotate(x).double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(hadamard.unrotate(hadamard.rotate(x)), x, rtol=0, atol=1e-6)
    assert abs(float(hadamard.rotate(x).norm()) - float(x.norm())) < 1e-4
    for bad in (torch.zeros(2, 48), torch.zeros(2, 0)):
        with pytest.raises(ValueError, match="power of two"):
            hadamard.rotate(bad)


def test_hadamard_basis_moves_every_value_of_a_whole_chunk_and_leaves_the_tail_in_its_own_basis():
    c, plain = RotateCodec(chunk=64, every=4, basis="hadamard").for_round(2), RotateCodec(64, 4).for_round(2)
    x = torch.randn(64 * 3 + 10, generator=gen(4))
    y, z = c.decode(c.encode(x), x.numel()), plain.decode(plain.encode(x), x.numel())
    # dense vs a quarter (a turned-back value is a sum of 16 signed levels: some cancel to exactly 0)
    assert int((y[:192] != 0).sum()) > 120 and int((z[:192] != 0).sum()) == 48
    assert torch.equal(y[192:], z[192:])  # the 10-value tail: the plain basis
    assert len(c.encode(x)) == len(plain.encode(x)) == c.payload_size(x.numel())
    small = torch.randn(40, generator=gen(5))  # shorter than a chunk: sent whole in its own basis
    assert torch.equal(c.decode(c.encode(small), 40), plain.decode(plain.encode(small), 40))
    assert not c.info.per_sender and plain.info.per_sender  # dense decoded payloads: the group's plain mean


def test_hadamard_payloads_are_averaged_as_coefficients_and_turned_back_once():
    """decode = finish_mean(decode_for_mean); a mean of coefficient payloads turned back is the mean of the
    decoded payloads (the rotation is linear); other codecs average what they decode."""
    c = RotateCodec(64, 4, "hadamard").for_round(1)
    xs = [torch.randn(300, generator=gen(10 + i)) for i in range(4)]
    payloads = [c.encode(x) for x in xs]
    for p in payloads:
        assert torch.equal(c.decode(p, 300), c.finish_mean(c.decode_for_mean(p, 300)))
    raw = [c.decode_for_mean(p, 300) for p in payloads]
    assert int((raw[0][:256] != 0).sum()) == 64  # a quarter of the coefficients, not turned back
    torch.testing.assert_close(c.finish_mean(sum(raw) / 4), sum(c.decode(p, 300) for p in payloads) / 4,
                               rtol=0, atol=1e-6)
    for other in (RotateCodec(64, 4, "coords"), get_codec(CodecConfig(name="int8"))):
        p = other.encode(xs[0])
        assert torch.equal(other.decode_for_mean(p, 300), other.decode(p, 300))
        assert other.finish_mean(xs[1]) is xs[1]


def test_a_payload_of_the_other_basis_is_refused():
    x = torch.randn(256, generator=gen(6))
    h, p = RotateCodec(64, 4, "hadamard"), RotateCodec(64, 4, "coords")
    with pytest.raises(CodecError):
        p.decode(h.encode(x), 256)
    with pytest.raises(CodecError):
        h.decode(p.encode(x), 256)


def test_hadamard_overflow_is_a_codec_error_not_an_infinity():
    """An input whose turned coefficients overflow is refused at encode; a hostile payload whose levels could
    overflow when turned back (alone or in a mean) is refused at decode (a decoder never returns Inf)."""
    c = RotateCodec(64, 4, "hadamard")
    with pytest.raises(CodecError):
        c.encode(torch.full((64,), 1e38))
    spike = torch.zeros(64)
    spike[5] = 1.2e38  # every coefficient +-1.5e37: finite, but 16 of such a level summed would not be
    with pytest.raises(CodecError, match="overflow"):
        c.encode(spike)
    payload = bytearray(c.encode(torch.randn(64, generator=gen(7))))
    payload[LEVELS_AT: LEVELS_AT + 2] = torch.tensor([3e38], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    with pytest.raises(CodecError, match="overflow"):
        c.decode(bytes(payload), 64)
