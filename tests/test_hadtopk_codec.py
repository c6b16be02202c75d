"""The hadtopk codec: each chunk's largest Hadamard coefficients at one bit, their Elias-Fano positions, one
level per chunk; the exact payload layout, averaging as coefficients, strict decoding of hostile payloads,
and the config checks that go with it."""

from __future__ import annotations

import math

import pytest
import torch

from swarmloco.compression import CodecError, get_codec
from swarmloco.compression import hadamard
from swarmloco.compression.error_feedback import error_feedback_for
from swarmloco.compression.hadtopk import HadTopKCodec
from swarmloco.compression.header import HEADER_SIZE
from swarmloco.compression.registry import codec_names
from swarmloco.config import CodecConfig, ConfigError, InnerConfig, OuterConfig, RunConfig


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference(x: torch.Tensor, chunk: int, fraction: float) -> torch.Tensor:
    """The decoded tensor, computed chunk by chunk from the documented semantics with a float64 Sylvester matrix."""
    n = x.numel()
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < chunk:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    d = hadamard.signs(chunk).double()
    out = torch.zeros(n)
    for start in range(0, n, chunk):
        part = x[start: start + chunk].double()
        whole = part.numel() == chunk
        z = (part * d) @ h / chunk ** 0.5 if whole else part
        keep = part.numel() if n < chunk else min(part.numel(), math.ceil(round(fraction * part.numel(), 9)))
        idx = z.abs().topk(keep).indices
        level = z[idx].float().abs().double().mean().to(torch.bfloat16).double()
        sent = torch.zeros_like(z)
        sent[idx] = torch.where(z[idx] < 0, -level, level)
        out[start: start + chunk] = (((sent @ h) / chunk ** 0.5) * d if whole else sent).float()
    return out


@pytest.mark.parametrize("n", [0, 1, 40, 64, 65, 64 * 3 + 10, 1000])
def test_decode_is_the_signs_of_the_largest_coefficients_at_the_chunk_level_turned_back(n):
    c = HadTopKCodec(chunk=64, fraction=0.1)  # 7 of 64
    x = torch.randn(n, generator=gen(n))
    payload = c.encode(x)
    assert len(payload) == c.payload_size(n)
    torch.testing.assert_close(c.decode(payload, n), reference(x, 64, 0.1), rtol=0, atol=2e-6)


def test_each_chunk_sends_keep_coefficients_and_a_short_tensor_is_sent_whole():
    c = HadTopKCodec(chunk=64, fraction=0.1)
    x = torch.randn(64 * 2 + 30, generator=gen(1))
    coefficients = c.decode_for_mean(c.encode(x), x.numel())
    assert [int((coefficients[s: s + 64] != 0).sum()) for s in (0, 64, 128)] == [7, 7, 3]  # tail: ceil(0.1 * 30)
    assert c.kept(x.numel()) == 17
    small = torch.randn(40, generator=gen(2))  # shorter than a chunk: every value, its sign at one level
    y = c.decode(c.encode(small), 40)
    assert torch.equal(y.sign(), small.sign()) and len(set(y.abs().tolist())) == 1


def test_bits_per_value_at_the_default_128_of_4096():
    """128 sign bits + Elias-Fano (5 low bits each + 256 high bits) + one bf16 level per 4096 values: 126x."""
    c = get_codec(CodecConfig(name="hadtopk"))
    assert c.keep(4096) == 128
    assert c.info.bits_per_value == (128 + 128 * 5 + 256 + 16) / 4096
    assert c.payload_size(4096 * 256) == HEADER_SIZE + 2 * 256 + 256 * (128 + 640 + 256) // 8
    assert 126 < 32 / c.info.bits_per_value < 126.1
    assert c.info.rest_in_model and not c.info.per_sender and not c.info.summable


def test_payloads_are_averaged_as_coefficients_and_turned_back_once():
    c = HadTopKCodec(64, 0.1)
    xs = [torch.randn(300, generator=gen(10 + i)) for i in range(4)]
    payloads = [c.encode(x) for x in xs]
    for p in payloads:
        assert torch.equal(c.decode(p, 300), c.finish_mean(c.decode_for_mean(p, 300)))
    raw = [c.decode_for_mean(p, 300) for p in payloads]
    torch.testing.assert_close(c.finish_mean(sum(raw) / 4), sum(c.decode(p, 300) for p in payloads) / 4,
                               rtol=0, atol=1e-6)


def test_its_rest_stays_in_the_model_and_the_config_knows_which_codecs_keep_theirs_there():
    ef = error_feedback_for(CodecConfig(name="hadtopk"), get_codec(CodecConfig(name="hadtopk")))
    assert ef is not None and ef.in_model and ef.decay == 1.0
    # the config's checks (error feedback on, blocking rounds of the whole model) ask the codec
    assert {name for name in codec_names() if CodecConfig(name=name).rest_in_model} == {"rotate", "hadtopk"}


# ---------------------------------------------------------------- hostile payloads


def _payload(n: int = 200) -> tuple[HadTopKCodec, bytes]:
    c = HadTopKCodec(64, 0.1)
    return c, c.encode(torch.randn(n, generator=gen(3)))


def test_truncated_extended_wrong_codec_wrong_chunk_and_wrong_numel_are_refused():
    c, p = _payload()
    for bad in (p[:-1], p + b"\0", p[:HEADER_SIZE]):
        with pytest.raises(CodecError):
            c.decode(bad, 200)
    with pytest.raises(CodecError, match="chunks of 64"):
        HadTopKCodec(128, 0.1).decode(p, 200)
    with pytest.raises(CodecError):
        get_codec(CodecConfig(name="topk", topk_chunk=64)).decode(p, 200)  # another codec's id
    with pytest.raises(CodecError):
        c.decode(get_codec(CodecConfig(name="rotate", rotate_chunk=64)).encode(torch.zeros(200)), 200)
    with pytest.raises(CodecError):
        c.decode(p, 199)


@pytest.mark.parametrize("level", [float("nan"), float("inf"), -1.0, 3e38])
def test_nan_inf_negative_and_overflowing_levels_are_refused(level):
    c, p = _payload()
    raw = torch.tensor([level], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    with pytest.raises(CodecError, match="level"):
        c.decode(p[:HEADER_SIZE + 2] + raw + p[HEADER_SIZE + 4:], 200)


def test_positions_that_are_not_strictly_increasing_inside_the_chunk_and_padding_bits_are_refused():
    c, p = _payload(64)
    bits_at = HEADER_SIZE + 2
    refused = 0
    for i in range(bits_at + 1, len(p)):  # every byte of the positions' fields set to all ones
        bad = p[:i] + b"\xff" + p[i + 1:]
        try:
            y = c.decode(bad, 64)
        except CodecError:
            refused += 1
            continue
        assert bool(torch.isfinite(y).all())
    assert refused >= len(p) - bits_at - 2
    with pytest.raises(CodecError):
        c.decode(p[:-1] + bytes([p[-1] | 0x80]), 64)  # 7 signs + 21 low + 15 high bits: the last 5 are padding


def test_encode_refuses_nan_inf_and_inputs_that_would_overflow():
    c = HadTopKCodec(64, 0.1)
    for bad in (float("nan"), float("inf")):
        x = torch.zeros(100)
        x[70] = bad
        with pytest.raises(CodecError):
            c.encode(x)
    with pytest.raises(CodecError):
        c.encode(torch.full((64,), 1e38))  # turned, the first coefficient overflows
    payload = bytearray(c.encode(torch.randn(64, generator=gen(7))))
    huge = torch.tensor([1e38], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    payload[HEADER_SIZE: HEADER_SIZE + 2] = huge
    with pytest.raises(CodecError, match="overflow"):
        c.decode(bytes(payload), 64)


# ---------------------------------------------------------------- config


def test_codec_config_checks_hadtopk_settings():
    assert get_codec(CodecConfig(name="hadtopk", hadtopk_chunk=256, hadtopk_fraction=0.5)).keep(256) == 128
    for kw, field in ((dict(hadtopk_chunk=96), "hadtopk_chunk"), (dict(hadtopk_chunk=0), "hadtopk_chunk"),
                      (dict(hadtopk_chunk=131072), "hadtopk_chunk"), (dict(hadtopk_fraction=0.0), "hadtopk_fraction"),
                      (dict(hadtopk_fraction=1.5), "hadtopk_fraction"), (dict(error_feedback=False), "error_feedback")):
        with pytest.raises(ConfigError, match=field):
            CodecConfig(name="hadtopk", **kw)
    with pytest.raises(ValueError, match="hadtopk_chunk"):
        HadTopKCodec(chunk=96)


@pytest.mark.parametrize("outer", [OuterConfig(overlap="delayed"), OuterConfig(fragments=2)],
                         ids=["delayed", "fragments"])
def test_run_config_refuses_hadtopk_with_overlap_or_fragments(outer):
    inner = InnerConfig(steps=50)
    with pytest.raises(ConfigError, match=r'outer\.(overlap|fragments).*"hadtopk"'):
        RunConfig(codec=CodecConfig(name="hadtopk"), inner=inner, outer=outer)
    RunConfig(codec=CodecConfig(name="hadtopk"), inner=inner)
