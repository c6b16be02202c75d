"""Property tests of the codecs: random shapes, dtypes and block sizes round-trip within bounds;
random and mutated payloads raise CodecError and nothing else."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_util import fuzz_settings
from swarmloco.compression import CodecError, get_codec
from swarmloco.compression import hadamard
from swarmloco.compression.header import HEADER_SIZE
from swarmloco.compression.rotate import RotateCodec
from swarmloco.config import CodecConfig

NAMES = ["none", "fp16", "bf16", "int8", "int4", "topk", "rotate", "rotate-hadamard", "hadtopk"]
LEVELS = {"int8": 127, "int4": 7}
FUZZ = fuzz_settings(50)  # the 10,000-input fuzzing of every decode is in test_decoder_fuzz.py


@st.composite
def tensors(draw):
    shape = draw(st.lists(st.integers(0, 40), min_size=0, max_size=3))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 1e4]))
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(int(np.prod(shape, dtype=np.int64))) * scale
    if draw(st.booleans()):
        values = values * np.exp(3 * rng.standard_normal(values.shape))  # heavy tails
    limit = 6e4 if dtype == torch.float16 else 1e30
    return torch.from_numpy(np.clip(values, -limit, limit)).to(torch.float32).reshape(shape).to(dtype)


def make(name: str, block_size: int, fraction: float):
    every = min(4, block_size)  # rotate: chunks of block_size rounded down to a multiple of every (1..4)
    chunk = 1 << (block_size.bit_length() - 1)  # hadamard bases: the largest power of two up to block_size
    if name == "rotate-hadamard":
        return get_codec(CodecConfig(name="rotate", rotate_chunk=chunk, rotate_every=min(4, chunk)))
    if name == "hadtopk":
        return get_codec(CodecConfig(name="hadtopk", hadtopk_chunk=chunk, hadtopk_fraction=fraction))
    return get_codec(CodecConfig(name=name, block_size=block_size, topk_chunk=block_size, topk_fraction=fraction,
                                 rotate_chunk=block_size - block_size % every, rotate_every=every,
                                 rotate_basis="coords"))


@FUZZ
@given(tensors(), st.sampled_from(NAMES), st.integers(1, 300), st.sampled_from([0.01, 0.3, 1.0]), st.integers(0, 9))
def test_roundtrip_property(x, name, block_size, fraction, step):
    c = make(name, block_size, fraction).for_round(step)  # (only rotate's values depend on the round)
    ref = x.to(torch.float32).reshape(-1)
    payload = c.encode(x)
    assert payload == c.encode(x.clone())
    y = c.decode(payload, ref.numel())
    assert y.shape == (ref.numel(),) and y.dtype == torch.float32 and bool(torch.isfinite(y).all())
    if name == "none":
        assert torch.equal(y, ref)
    elif name in ("fp16", "bf16"):
        tol = 2**-11 if name == "fp16" else 2**-8
        clamped = ref.clamp(-65504, 65504) if name == "fp16" else ref  # fp16 clamps to its range
        assert bool(((y - clamped).abs() <= clamped.abs() * tol + 6e-8).all())  # 6e-8: fp16 subnormal spacing
    elif name in LEVELS:
        pad = (-ref.numel()) % block_size
        absmax = torch.cat([ref, ref.new_zeros(pad)]).view(-1, block_size).abs().amax(1) if ref.numel() else ref
        bound = (absmax / (2 * LEVELS[name])).repeat_interleave(block_size)[: ref.numel()]
        assert bool(((y - ref).abs() <= bound * (1 + 1e-5) + 1e-37).all())
    elif name == "rotate":
        assert make(name, block_size, fraction).decode(payload, ref.numel()).equal(y)  # the phase is in the payload
        check_rotate(c, ref, y)
    elif name == "rotate-hadamard":
        assert make(name, block_size, fraction).decode(payload, ref.numel()).equal(y)
        check_hadamard(c, ref, payload, y)
    elif name == "hadtopk":
        check_hadtopk(c, ref, payload, y)
    elif ref.numel():  # topk: per chunk at most k nonzero, each with its value's sign and a magnitude
        for start in range(0, ref.numel(), block_size):  # between the smallest and largest kept magnitude
            xs, ys = ref[start: start + block_size], y[start: start + block_size]
            kept = xs.abs().topk(c.kept(ref.numel()) if ref.numel() < block_size else c.keep(xs.numel())).values
            nonzero = ys != 0
            assert int(nonzero.sum()) <= kept.numel()
            signed = nonzero & (xs != 0)  # a kept 0 (fewer nonzeros than k) decodes to +level
            assert bool((ys[signed].sign() == xs[signed].sign()).all()) and bool((ys[nonzero & (xs == 0)] > 0).all())
            mags = ys[nonzero].abs()
            assert bool((mags >= kept.min() * (1 - 2**-8)).all() and (mags <= kept.max() * (1 + 2**-8)).all())


def check_rotate(c, ref: torch.Tensor, y: torch.Tensor) -> None:
    """Per chunk: nonzero only where the round sends, each sent value at the chunk's one level, bf16(mean |sent|),
    with its input's sign (a zero: +level)."""
    mask = c.sent_mask(ref.numel())
    assert int(mask.sum()) == c.sent_count(ref.numel())
    chunk = max(1, ref.numel()) if ref.numel() < c.chunk else c.chunk  # shorter than a chunk: sent whole
    for start in range(0, ref.numel(), chunk):
        xs, ys, ms = ref[start: start + chunk], y[start: start + chunk], mask[start: start + chunk]
        assert int(ms.sum()) == (xs.numel() if chunk < c.chunk else len(range((c.phase + start // chunk) % c.every,
                                                                                xs.numel(), c.every)))
        assert not bool(ys[~ms].any())
        level = xs[ms].abs().double().mean().to(torch.bfloat16).float() if ms.any() else torch.tensor(0.0)
        assert bool((ys[ms] == torch.where(xs[ms] < 0, -level, level)).all())
        assert not bool(torch.signbit(ys[ms & (xs >= 0)]).any())


def check_hadamard(c, ref: torch.Tensor, payload: bytes, y: torch.Tensor) -> None:
    """The hadamard basis is the coords basis on each whole chunk's turned coefficients, turned back after."""
    n, coords = ref.numel(), RotateCodec(c.chunk, c.every).for_round(c.phase)
    full = n // c.chunk * c.chunk if n >= c.chunk else 0
    z = ref.clone()
    z[:full] = hadamard.rotate(z[:full].view(-1, c.chunk)).reshape(-1)
    assert payload[HEADER_SIZE:] == coords.encode(z)[HEADER_SIZE:]  # the same body; the header's codec id differs
    want = coords.decode(coords.encode(z), n)
    want[:full] = hadamard.unrotate(want[:full].view(-1, c.chunk)).reshape(-1)
    assert torch.equal(y, want)
    check_rotate(coords, z, coords.decode(coords.encode(z), n))


def check_hadtopk(c, ref: torch.Tensor, payload: bytes, y: torch.Tensor) -> None:
    """Per chunk of turned coefficients (a tail, a short tensor: its own values): at most ``keep`` nonzero, all
    among the largest |coefficients|, each at the chunk's level, bf16(mean of the ``keep`` largest |coefficients|),
    with its coefficient's sign (a zero: +level); the decode is that, turned back."""
    n = ref.numel()
    assert len(payload) == c.payload_size(n)
    full = n // c.chunk * c.chunk
    z = ref.clone()
    z[:full] = hadamard.rotate(z[:full].view(-1, c.chunk)).reshape(-1)
    coefficients = c.decode_for_mean(payload, n)
    assert torch.equal(y, c.finish_mean(coefficients))
    for start in range(0, n, c.chunk if n >= c.chunk else max(1, n)):
        zs, cs = z[start: start + c.chunk], coefficients[start: start + c.chunk]
        keep = c.keep(zs.numel()) if n >= c.chunk else zs.numel()
        top = zs.abs().topk(keep).values
        nonzero = cs != 0
        assert int(nonzero.sum()) <= keep and bool((zs[nonzero].abs() >= top.min()).all())
        level = top.double().mean().to(torch.bfloat16).float()
        assert bool((cs[nonzero].abs() == level).all())
        signed = nonzero & (zs != 0)
        assert bool((cs[signed].sign() == zs[signed].sign()).all()) and bool((cs[nonzero & (zs == 0)] > 0).all())


@FUZZ
@given(st.integers(0, 700), st.integers(1, 8), st.integers(1, 40), st.integers(0, 20), st.integers(0, 2**31 - 1),
       st.sampled_from([0.0, 0.5, 1.0]))
def test_rotate_sends_each_rounds_share_with_signs_and_chunk_levels(numel, every, per_chunk, step, seed, zeros):
    """Sizes around many chunks (the shapes above are mostly smaller than a chunk), every phase."""
    c = get_codec(CodecConfig(name="rotate", rotate_chunk=every * per_chunk, rotate_every=every,
                              rotate_basis="coords")).for_round(step)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * (torch.rand(numel, generator=g) >= zeros * 0.5)  # some exact zeros
    payload = c.encode(x)
    assert len(payload) == c.payload_size(numel)
    y = RotateCodec(every * per_chunk, every).decode(payload, numel)
    check_rotate(c, x, y)


@FUZZ
@given(st.sampled_from(NAMES), st.integers(0, 600), st.binary(max_size=1200), st.integers(1, 300))
def test_random_bytes_raise_codec_error_only(name, numel, payload, block_size):
    c = make(name, block_size, 0.05)
    try:
        y = c.decode(payload, numel)
    except CodecError:
        return
    assert y.shape == (numel,) and bool(torch.isfinite(y).all())


@FUZZ
@given(st.sampled_from(NAMES), st.integers(0, 700), st.data())
def test_mutated_payloads_raise_codec_error_only(name, numel, data):
    block_size = data.draw(st.sampled_from([1, 5, 64, 256, 300]))
    c = make(name, block_size, data.draw(st.sampled_from([0.02, 0.5])))
    sender = c.for_round(data.draw(st.integers(0, 3)))  # rotate: a payload of any phase decodes anywhere
    payload = bytearray(sender.encode(torch.randn(numel, generator=torch.Generator().manual_seed(numel))))
    edit = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if edit == "flip" and payload:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(payload) - 1))
            payload[i] = data.draw(st.integers(0, 255))
    elif edit == "truncate":
        payload = payload[: data.draw(st.integers(0, max(0, len(payload) - 1)))]
    elif edit == "extend":
        payload += data.draw(st.binary(min_size=1, max_size=64))
    else:
        i = data.draw(st.integers(0, len(payload)))
        payload[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        y = c.decode(bytes(payload), numel)
    except CodecError:
        return
    assert y.shape == (numel,) and bool(torch.isfinite(y).all())
