"""Bit fields of the sparse codec: fixed-width integers packed LSB first, and Elias-Fano index sets.

Everything is vectorized torch on flat uint8 "bit" tensors (one 0/1 per element), packed into bytes
once at the end, so a payload's layout depends only on the tensor's size and the codec's settings.

**Elias-Fano** (Elias 1974, Fano 1971; the standard coding of sorted sparse index sets): ``k``
strictly increasing indices below ``C`` are split into ``l = floor(log2(C / k))`` low bits, stored
as they are, and the high part ``i >> l``, stored in unary as a bitmap of ``k + ((C - 1) >> l) + 1``
bits with a one at ``(i_j >> l) + j`` for the j-th index. That is at most ``l + 2`` bits per index
(8 for 64 of 4096, against 12 for plain 12-bit indices), and decoding is a ``nonzero`` over the
bitmap. A decoder of untrusted bits checks that every row holds exactly ``k`` ones and that the
decoded indices are strictly increasing and below ``C``.
"""

from __future__ import annotations

import torch

from swarmloco.compression.base import CodecError

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A flat 0/1 uint8 tensor -> uint8 bytes, LSB first, the last byte zero-padded."""
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return (bits.view(-1, 8) << _SHIFTS).sum(dim=1, dtype=torch.uint8) if bits.numel() else bits


def unpack_bits(data: torch.Tensor, nbits: int, name: str) -> torch.Tensor:
    """uint8 bytes -> the first ``nbits`` bits (0/1 uint8); CodecError if a padding bit is set."""
    if data.numel() != (nbits + 7) // 8:
        raise CodecError(f"{name}: {data.numel()} bytes of bits, expected {(nbits + 7) // 8}")
    bits = ((data[:, None] >> _SHIFTS) & 1).reshape(-1)
    if bits.numel() > nbits and bool(bits[nbits:].any()):
        raise CodecError(f"{name}: padding bits are not zero")
    return bits[:nbits]


def int_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """Non-negative integers (< 2**width) -> ``width`` bits each, LSB first, flattened."""
    if width == 0:
        return torch.zeros(0, dtype=torch.uint8)
    shifts = torch.arange(width, dtype=torch.int64)
    return ((values.reshape(-1, 1).long() >> shifts) & 1).to(torch.uint8).reshape(-1)


def bits_int(bits: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The inverse of :func:`int_bits`: ``count`` values of ``width`` bits each -> int64 values."""
    if width == 0:
        return torch.zeros(count, dtype=torch.int64)
    shifts = torch.arange(width, dtype=torch.int64)
    return (bits.view(-1, width).long() << shifts).sum(dim=1)


def ef_low_bits(length: int, keep: int) -> int:
    """Elias-Fano's low-bit width for ``keep`` indices below ``length``: floor(log2(length / keep))."""
    return max(0, (length // keep).bit_length() - 1) if keep else 0


def ef_sizes(length: int, keep: int) -> tuple[int, int]:
    """(low bits, high bits) of one Elias-Fano row."""
    if keep == 0:
        return 0, 0
    low = ef_low_bits(length, keep)
    return keep * low, keep + ((length - 1) >> low) + 1


def ef_encode(indices: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``k`` strictly increasing indices below ``length`` -> (low bits, high bits), row after row."""
    rows, keep = indices.shape
    low_w = ef_low_bits(length, keep)
    _, high_n = ef_sizes(length, keep)
    idx = indices.long()
    low = int_bits(idx & ((1 << low_w) - 1), low_w)
    high = torch.zeros(rows, high_n, dtype=torch.uint8)
    high.scatter_(1, (idx >> low_w) + torch.arange(keep), 1)
    return low, high.reshape(-1)


def ef_decode(low: torch.Tensor, high: torch.Tensor, rows: int, keep: int, length: int, name: str) -> torch.Tensor:
    """The inverse of :func:`ef_encode` for untrusted bits: (rows, keep) int64 indices or CodecError."""
    if rows == 0 or keep == 0:
        return torch.zeros(rows, keep, dtype=torch.int64)
    low_w = ef_low_bits(length, keep)
    _, high_n = ef_sizes(length, keep)
    bitmap = high.view(rows, high_n)
    if not bool((bitmap.sum(dim=1, dtype=torch.int64) == keep).all()):
        raise CodecError(f"{name}: an index bitmap does not hold exactly {keep} entries")
    ones = bitmap.nonzero()[:, 1].view(rows, keep)  # row-major: increasing within each row
    idx = ((ones - torch.arange(keep)) << low_w) | bits_int(low, low_w, rows * keep).view(rows, keep)
    if int(idx.max()) >= length:
        raise CodecError(f"{name}: an index is outside its chunk of {length} values")
    if keep > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
        raise CodecError(f"{name}: indices within a chunk are not strictly increasing")
    return idx


__all__ = ["bits_int", "ef_decode", "ef_encode", "ef_low_bits", "ef_sizes", "int_bits", "pack_bits", "unpack_bits"]
