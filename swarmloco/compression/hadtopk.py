"""Top-k of each chunk's Hadamard coefficients at one bit each, the rest kept in the peer's model.

Each whole chunk of ``chunk`` values is turned by the fixed random rotation of
:mod:`~swarmloco.compression.hadamard` (the ``rotate`` codec's), and of its coefficients the peer sends the
``k = ceil(fraction * chunk)`` of largest magnitude: one sign bit each, their positions Elias-Fano coded
(:mod:`~swarmloco.compression.bits`), and one bf16 level per chunk (the mean |coefficient| sent). A tensor's
tail shorter than a chunk keeps ``ceil(fraction * its length)`` of its own values; a tensor shorter than a
chunk is sent whole, one bit per value. At the default that is 0.254 bits per value.

What a round does not send stays in the peer's own parameters (error feedback's ``in_model``). Each peer picks
its own coefficients, so one that a peer did not send counts as zero from it: the round averages over the whole
group (``CodecInfo.per_sender`` is false) in the rotated basis (:meth:`decode_for_mean`), turning the group's
mean back once (:meth:`finish_mean`). Why and how well, against ``rotate``: docs/codecs.md.

Payload: 16-byte header (block_size = chunk) | bf16 levels [chunks] | bit fields, packed LSB first: for the
whole chunks, then the short last one: sign bits (1: negative), Elias-Fano low bits, Elias-Fano high bitmaps.
The layout is fixed by the tensor's size; ``decode`` rejects a wrong chunk, a wrong length, non-zero padding
bits, non-finite, negative or overflowing levels, and index sets that are not exactly ``k`` strictly increasing
indices inside their chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarmloco.checks import check, is_int, is_number
from swarmloco.compression.base import Codec, CodecError, CodecInfo, CodecSettings
from swarmloco.compression.bits import ef_encode, pack_bits, unpack_bits
from swarmloco.compression.hadamard import is_power_of_two, rotate_chunks, unrotate_chunks
from swarmloco.compression.header import (
    CODEC_IDS, HEADER_SIZE, MAX_BLOCK_SIZE, MAX_ENCODABLE, block_absmax, check_levels, chunks, flat_float32,
    pack_header,
)
from swarmloco.compression.topk import ChunkedTopK

TUNED_OUTER = (1.6, 0.6)
"""Nesterov lr and momentum this codec was tuned with (BENCHMARKS.md: within +0.5% of dense DiLoCo at H=30 over
three seeds, 2.7% below it at H=10; dense DiLoCo's 1.0 / 0.7 leaves parts that arrive rounds late too small a
step): what a run that names ``hadtopk`` and leaves ``outer.lr`` / ``outer.momentum`` unset uses."""


@dataclass(frozen=True, kw_only=True)
class HadTopKSettings(CodecSettings):
    """The ``hadtopk`` codec's settings."""

    hadtopk_fraction: float = 0.03125
    """Fraction of each chunk's coefficients sent (1/32: 128 of 4096, 126x below fp32)."""
    hadtopk_chunk: int = 4096
    """Values per chunk (a power of two); each chunk is turned and sends its own largest coefficients
    and one bf16 level; tensors shorter than a chunk are sent whole."""

    def __post_init__(self) -> None:
        check(is_number(self.hadtopk_fraction) and 0.0 < self.hadtopk_fraction <= 1.0,
              "codec.hadtopk_fraction", self.hadtopk_fraction, "must be in (0, 1]")
        check(is_int(self.hadtopk_chunk) and 1 <= self.hadtopk_chunk <= MAX_BLOCK_SIZE
              and is_power_of_two(self.hadtopk_chunk), "codec.hadtopk_chunk", self.hadtopk_chunk,
              f"must be a power of two in 1..{MAX_BLOCK_SIZE}")


class HadTopKCodec(ChunkedTopK, Codec):
    """The ``ceil(fraction * chunk)`` largest Hadamard coefficients of each ``chunk``-value chunk, one sign bit
    each, Elias-Fano positions, one bf16 level per chunk."""

    NAME = "hadtopk"
    settings_class = HadTopKSettings

    def __init__(self, chunk: int = HadTopKSettings.hadtopk_chunk,
                 fraction: float = HadTopKSettings.hadtopk_fraction):
        if not isinstance(chunk, int) or not 1 <= chunk <= MAX_BLOCK_SIZE or not is_power_of_two(chunk):
            raise ValueError(f"config: codec.hadtopk_chunk={chunk!r} is invalid: must be a power of two in "
                             f"1..{MAX_BLOCK_SIZE}")
        if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
            raise ValueError(f"config: codec.hadtopk_fraction={fraction!r} is invalid: must be in (0, 1]")
        self.chunk, self.fraction = chunk, float(fraction)
        self._max_level = MAX_ENCODABLE / self.keep(chunk)
        """Turning a chunk back sums ``keep(chunk)`` coefficients of one level (a group's mean: of the mean
        level): above this such a sum could overflow, so encode and decode refuse such levels."""
        self.info = CodecInfo(name=self.NAME, bits_per_value=(self._row_bits(chunk) + 16) / chunk, lossy=True,
                              summable=False, per_sender=False, rest_in_model=True, outer=TUNED_OUTER)

    @classmethod
    def from_settings(cls, settings: HadTopKSettings) -> HadTopKCodec:
        return cls(settings.hadtopk_chunk, settings.hadtopk_fraction)

    def _row_bits(self, length: int, keep: int | None = None) -> int:
        """Bit-field bits of one chunk of ``length`` values keeping ``keep`` (default: a full chunk's share)."""
        keep = self.keep(length) if keep is None else keep
        return keep + sum(self._index_bits(length, keep))

    def _bit_count(self, numel: int) -> int:
        return sum(rows * self._row_bits(length, keep) for _, rows, length, keep in self._groups(numel))

    def payload_size(self, numel: int) -> int:
        """Exact bytes of the payload of a ``numel``-value tensor."""
        return HEADER_SIZE + 2 * -(-numel // self.chunk) + (self._bit_count(numel) + 7) // 8

    # ----- encoding ---------------------------------------------------------------------------
    def _select(self, flat: torch.Tensor, start: int, rows: int, length: int, keep: int):
        """Top-``keep`` of each row: (sorted positions, sign bits, levels)."""
        idx_parts, sign_parts, level_parts = [], [], []
        for s, e in chunks(rows * length, length):  # ~1M values at a time: temporaries stay small
            mat = flat[start + s: start + e].view(-1, length)
            idx = mat.abs().topk(keep, dim=1, sorted=False).indices.sort(dim=1).values
            vals = mat.gather(1, idx)
            idx_parts.append(idx)
            sign_parts.append((vals < 0).to(torch.uint8).reshape(-1))
            level_parts.append(vals.abs().double().mean(dim=1).to(torch.bfloat16))  # (float64: sums stay finite)
        return torch.cat(idx_parts), torch.cat(sign_parts), torch.cat(level_parts)

    def encode(self, tensor: torch.Tensor) -> bytes:
        flat = flat_float32(tensor)
        n = flat.numel()
        if n:
            block_absmax(flat.view(1, -1), self.NAME)  # NaN/Inf or overflowing input: CodecError
        if n >= self.chunk:
            flat = rotate_chunks(flat, self.chunk)
            block_absmax(flat.view(1, -1), self.NAME)  # turned, a huge input can overflow: CodecError
        levels, fields = [], []
        for start, count, length, keep in self._groups(n):
            idx, signs, lv = self._select(flat, start, count, length, keep)
            levels.append(lv)
            fields.append(signs)
            if keep < length:
                fields += list(ef_encode(idx, length))
        level_t = torch.cat(levels) if levels else torch.zeros(0, dtype=torch.bfloat16)
        if level_t.numel() and float(level_t.max()) > self._max_level:
            raise CodecError(f"{self.NAME}: input too large: its levels would overflow when turned back")
        bits = pack_bits(torch.cat(fields)) if fields else torch.zeros(0, dtype=torch.uint8)
        return b"".join([pack_header(CODEC_IDS[self.NAME], n, self.chunk), level_t.view(torch.uint8).numpy().tobytes(),
                         bits.numpy().tobytes()])

    # ----- decoding ---------------------------------------------------------------------------
    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        return self.finish_mean(self.decode_for_mean(payload, numel))

    def finish_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """Whole chunks turned back (a new tensor); a tensor shorter than a chunk is ``mean`` itself."""
        return unrotate_chunks(mean, self.chunk)

    def decode_for_mean(self, payload: bytes, numel: int) -> torch.Tensor:
        """The sent coefficients (whole chunks: not turned back) and tail values at their places, 0 elsewhere."""
        data = self._open(payload, numel)
        nchunks = -(-numel // self.chunk)
        levels = data[HEADER_SIZE: HEADER_SIZE + 2 * nchunks].view(torch.bfloat16).float()
        check_levels(levels, self.NAME, self._max_level)
        bits = unpack_bits(data[HEADER_SIZE + 2 * nchunks:], self._bit_count(numel), self.NAME)
        out = torch.zeros(numel, dtype=torch.float32)
        at, row0 = 0, 0
        for start, rows, length, keep in self._groups(numel):
            negative = bits[at: at + rows * keep].bool().view(rows, keep)
            idx, at = self._positions(bits, at + rows * keep, rows, length, keep)
            mag = levels[row0: row0 + rows].view(rows, 1).expand(rows, keep)
            out[start: start + rows * length].view(rows, length).scatter_(1, idx, torch.where(negative, -mag, mag))
            row0 += rows
        return out


__all__ = ["HadTopKCodec", "HadTopKSettings"]
