"""SparseLoCo's compressor: chunked top-k with 2-bit values and Elias-Fano indices.

SparseLoCo (Sarfi et al., 2025, arXiv:2508.15706) sends, per chunk of ``chunk`` values of the error-feedback
accumulator, the ``k = ceil(fraction * chunk)`` entries of largest magnitude and keeps the rest in the
accumulator, which, decayed by ``beta``, acts as the outer momentum (:mod:`swarmloco.compression.error_feedback`).
A kept value is 2 bits: its sign and whether its magnitude is above the mean of the chunk's kept ones, decoded as
the mean magnitude of that half (two bf16 levels per chunk); its index is Elias-Fano coded
(:mod:`swarmloco.compression.bits`). That is 0.164 bits per value at 64 of 4096. A tensor's last chunk keeps
``ceil(fraction * its length)``; a tensor shorter than a chunk is sent whole, 2 bits per value and no indices.
Sparse payloads do not add up part by part (``info.summable`` is False): they travel by all-gather, and each
coordinate is averaged over the peers that sent it (:func:`swarmloco.protocol.robust.sender_mean`).

Payload: 16-byte header (block_size = chunk) | bf16 levels [chunks x 2: low, high] | bit fields, packed LSB
first, for the full chunks, then the short last one: 2-bit codes, Elias-Fano low bits, Elias-Fano high bitmaps.
The layout is fixed by the tensor's size; ``decode`` rejects a wrong chunk or length, non-zero padding bits,
non-finite, negative or unordered levels, and index sets that are not exactly ``k`` strictly increasing indices
inside their chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from swarmloco.checks import check, is_int, is_number
from swarmloco.compression.base import Codec, CodecError, CodecInfo, CodecSettings
from swarmloco.compression.bits import bits_int, ef_decode, ef_encode, ef_sizes, int_bits, pack_bits, unpack_bits
from swarmloco.compression.header import (
    CODEC_IDS, HEADER_SIZE, MAX_BLOCK_SIZE, block_absmax, check_length, check_levels, chunks, flat_float32,
    pack_header, payload_tensor, read_header,
)

CODE_BITS = 2


@dataclass(frozen=True, kw_only=True)
class TopKSettings(CodecSettings):
    """The ``topk`` codec's settings (SparseLoCo's defaults)."""

    topk_fraction: float = 0.015625
    """Fraction of each chunk's values sent (SparseLoCo: 64 of 4096, 1.56%)."""
    topk_chunk: int = 4096
    """Values per chunk; each chunk sends its own largest entries."""
    topk_decay: float = 0.95
    """Decay of the error-feedback accumulator (SparseLoCo's beta; it acts as the outer momentum,
    so use it with outer.momentum = 0). The dense codecs' error feedback does not decay."""

    def __post_init__(self) -> None:
        check(is_number(self.topk_fraction) and 0.0 < self.topk_fraction <= 1.0,
              "codec.topk_fraction", self.topk_fraction, "must be in (0, 1]")
        check(is_int(self.topk_chunk) and 1 <= self.topk_chunk <= MAX_BLOCK_SIZE, "codec.topk_chunk",
              self.topk_chunk, f"must be an integer in 1..{MAX_BLOCK_SIZE}")
        check(is_number(self.topk_decay) and 0.0 <= self.topk_decay <= 1.0, "codec.topk_decay",
              self.topk_decay, "must be in [0, 1]")

    @property
    def feedback_decay(self) -> float:
        """``topk_decay``: with ``e = beta * e + delta; send C(e); e -= C(e)`` the accumulator plays the outer
        momentum (SparseLoCo)."""
        return self.topk_decay


class ChunkedTopK:
    """Which entries a chunked top-k keeps (``topk``, ``hadtopk``): ``ceil(fraction * chunk)`` of each ``chunk``
    values, as many of a tensor's shorter last chunk, every value of a tensor shorter than one chunk."""

    NAME: str
    chunk: int
    fraction: float

    def keep(self, length: int) -> int:
        """How many values a chunk of ``length`` values keeps (at least one of a non-empty chunk)."""
        return min(length, math.ceil(round(self.fraction * length, 9)))

    def kept(self, numel: int) -> int:
        """How many values a ``numel``-value tensor's payload carries."""
        return sum(rows * keep for _, rows, _, keep in self._groups(numel))

    @staticmethod
    def _index_bits(length: int, keep: int) -> tuple[int, int]:
        """Elias-Fano (low, high) bits of a chunk's indices; none when the chunk is sent whole."""
        return (0, 0) if keep == length else ef_sizes(length, keep)

    def _groups(self, numel: int) -> list[tuple[int, int, int, int]]:
        """(first value, rows, row length, kept per row) of the full chunks and of the short last one; a
        tensor shorter than one chunk is one row kept whole."""
        full, tail = divmod(numel, self.chunk)
        groups = [(0, full, self.chunk, self.keep(self.chunk))] if full else []
        if tail:
            groups.append((full * self.chunk, 1, tail, self.keep(tail) if full else tail))
        return groups

    def _open(self, payload: bytes, numel: int) -> torch.Tensor:
        """The payload's bytes, once its header (this codec, ``numel``, this run's chunk) and exact length
        (:meth:`payload_size`) are checked; CodecError otherwise."""
        chunk = read_header(payload, CODEC_IDS[self.NAME], numel, self.NAME)
        if chunk != self.chunk:
            raise CodecError(f"{self.NAME}: payload uses chunks of {chunk} values, this run {self.chunk}")
        check_length(payload, self.payload_size(numel), self.NAME)
        return payload_tensor(payload)

    def _positions(self, bits: torch.Tensor, at: int, rows: int, length: int, keep: int) -> tuple[torch.Tensor, int]:
        """A group's (rows, keep) positions read from the bit fields at ``at`` (Elias-Fano; all of a chunk sent
        whole), and where the next field starts."""
        if keep == length:
            return torch.arange(length).expand(rows, length), at
        low_n, high_n = self._index_bits(length, keep)
        idx = ef_decode(bits[at: at + rows * low_n], bits[at + rows * low_n: at + rows * (low_n + high_n)],
                        rows, keep, length, self.NAME)
        return idx, at + rows * (low_n + high_n)


class TopKCodec(ChunkedTopK, Codec):
    """Top ``fraction`` of |values| of each ``chunk``-value chunk, 2-bit values, Elias-Fano indices."""

    NAME = "topk"
    settings_class = TopKSettings

    def __init__(self, chunk: int = TopKSettings.topk_chunk, fraction: float = TopKSettings.topk_fraction):
        if not isinstance(chunk, int) or not 1 <= chunk <= MAX_BLOCK_SIZE:
            raise ValueError(f"config: codec.topk_chunk={chunk!r} is invalid: must be in 1..{MAX_BLOCK_SIZE}")
        if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
            raise ValueError(f"config: codec.topk_fraction={fraction!r} is invalid: must be in (0, 1]")
        self.chunk, self.fraction = chunk, float(fraction)
        self.info = CodecInfo(name=self.NAME, bits_per_value=self._row_bits(chunk) / chunk, lossy=True,
                              summable=False, per_sender=True)

    @classmethod
    def from_settings(cls, settings: TopKSettings) -> TopKCodec:
        return cls(settings.topk_chunk, settings.topk_fraction)

    def _row_bits(self, length: int, keep: int | None = None) -> int:
        """Bits of one chunk of ``length`` values keeping ``keep`` (default: a full chunk's share)."""
        keep = self.keep(length) if keep is None else keep
        return 32 + CODE_BITS * keep + sum(self._index_bits(length, keep))

    def _bit_count(self, numel: int) -> int:
        return sum(rows * (self._row_bits(length, keep) - 32) for _, rows, length, keep in self._groups(numel))

    def payload_size(self, numel: int) -> int:
        """Exact bytes of the payload of a ``numel``-value tensor."""
        nchunks = -(-numel // self.chunk)
        return HEADER_SIZE + 4 * nchunks + (self._bit_count(numel) + 7) // 8

    # ----- encoding ---------------------------------------------------------------------------
    def _select(self, flat: torch.Tensor, start: int, rows: int, length: int, keep: int):
        """Top-``keep`` of each row: (sorted indices, 2-bit codes, low levels, high levels)."""
        idx_parts, code_parts, lo_parts, hi_parts = [], [], [], []
        for s, e in chunks(rows * length, length):  # ~1M values at a time: temporaries stay small
            mat = flat[start + s: start + e].view(-1, length)
            block_absmax(mat, self.NAME)  # NaN/Inf or overflowing input: CodecError
            idx = mat.abs().topk(keep, dim=1, sorted=False).indices.sort(dim=1).values
            vals = mat.gather(1, idx)
            mag = vals.abs().double()  # sums of up to 65536 float32 magnitudes stay finite in float64
            high = mag > mag.mean(dim=1, keepdim=True)
            n_high = high.sum(dim=1)
            n_low = keep - n_high
            lo = (mag * ~high).sum(dim=1) / n_low.clamp_min(1)
            hi = (mag * high).sum(dim=1) / n_high.clamp_min(1)
            lo, hi = torch.where(n_low > 0, lo, hi), torch.where(n_high > 0, hi, lo)  # an empty half: the other's
            idx_parts.append(idx)
            code_parts.append((vals < 0).to(torch.int64) | (high.to(torch.int64) << 1))
            lo_parts.append(lo.to(torch.bfloat16))
            hi_parts.append(hi.to(torch.bfloat16))
        return torch.cat(idx_parts), torch.cat(code_parts), torch.cat(lo_parts), torch.cat(hi_parts)

    def encode(self, tensor: torch.Tensor) -> bytes:
        flat = flat_float32(tensor)
        n = flat.numel()
        levels, fields = [], []
        for start, rows, length, keep in self._groups(n):
            idx, codes, lo, hi = self._select(flat, start, rows, length, keep)
            levels.append(torch.stack([lo, hi], dim=1).reshape(-1))
            fields.append(int_bits(codes, CODE_BITS))
            if keep < length:
                fields += list(ef_encode(idx, length))
        level_bytes = torch.cat(levels).view(torch.uint8) if levels else torch.zeros(0, dtype=torch.uint8)
        bits = pack_bits(torch.cat(fields)) if fields else torch.zeros(0, dtype=torch.uint8)
        return b"".join([pack_header(CODEC_IDS[self.NAME], n, self.chunk), level_bytes.numpy().tobytes(),
                         bits.numpy().tobytes()])

    # ----- decoding ---------------------------------------------------------------------------
    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        data = self._open(payload, numel)
        nchunks = -(-numel // self.chunk)
        levels = data[HEADER_SIZE: HEADER_SIZE + 4 * nchunks].view(torch.bfloat16).float().view(-1, 2)
        _check_levels(levels, self.NAME)
        bits = unpack_bits(data[HEADER_SIZE + 4 * nchunks:], self._bit_count(numel), self.NAME)
        out = torch.zeros(numel, dtype=torch.float32)
        at, row0 = 0, 0
        for start, rows, length, keep in self._groups(numel):
            n_codes = CODE_BITS * rows * keep
            codes = bits_int(bits[at: at + n_codes], CODE_BITS, rows * keep).view(rows, keep)
            idx, at = self._positions(bits, at + n_codes, rows, length, keep)
            lv = levels[row0: row0 + rows]
            mag = torch.where(codes >= 2, lv[:, 1:2], lv[:, 0:1])
            vals = torch.where((codes & 1).bool(), -mag, mag)
            out[start: start + rows * length].view(rows, length).scatter_(1, idx, vals)
            row0 += rows
        return out


def _check_levels(levels: torch.Tensor, name: str) -> None:
    """Each chunk's two magnitudes: finite, >= 0, low <= high (what the encoder writes). Decoded values
    are +-level, so finite levels give finite values."""
    check_levels(levels, name)
    if levels.numel() and not bool((levels[:, 0] <= levels[:, 1]).all()):
        raise CodecError(f"{name}: a chunk's low level is above its high level")


__all__ = ["ChunkedTopK", "TopKCodec", "TopKSettings"]
