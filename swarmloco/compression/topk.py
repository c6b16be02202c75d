"""Sparse top-k per chunk with int8 values: the compressor of SparseLoCo / DeMo-style communication.

DeMo (Peng, Quesnelle & Kingma, 2024, "DeMo: Decoupled Momentum Optimization") and SparseLoCo
(Sarfi et al., 2025, "Communication Efficient LLM Pre-training with SparseLoCo") send only the
largest entries of each chunk of the (error-compensated) pseudo-gradient, quantized to few bits,
and keep the rest in an error-feedback buffer. Per chunk of ``block_size`` values we keep the
``ceil(fraction * chunk)`` largest |x|, quantize them to int8 with one absmax scale per chunk, and
send their indices within the chunk (uint8 when block_size <= 256, else uint16). Sparse payloads
from different peers do not add up part by part, so ``info.summable`` is False: they travel by
all-gather and are summed after decoding.

Payload: 16-byte header | float32 scales [chunks] | indices [K] | int8 values [K]. Indices are
sorted within each chunk, which makes the bytes canonical and lets ``decode`` check range and
uniqueness in one comparison (strictly increasing). Without error feedback most of the signal is
dropped; with it (see :mod:`error_feedback`) everything is sent eventually.
"""

from __future__ import annotations

import math

import torch

from swarmloco.compression.base import Codec, CodecError, CodecInfo
from swarmloco.compression.header import (
    CODEC_IDS, HEADER_SIZE, block_absmax, check_block_size, check_length, check_scales, chunks, flat_float32,
    pack_header, payload_tensor, quantize_blocks, read_header,
)

LEVELS = 127


class TopKCodec(Codec):
    """Keep the top ``fraction`` of |values| of each chunk, int8-quantized, with their indices."""

    NAME = "topk"

    def __init__(self, block_size: int = 256, fraction: float = 0.02):
        self.block_size = check_block_size(block_size, self.NAME)
        if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
            raise ValueError(f"config: codec.topk_fraction={fraction!r} is invalid: must be in (0, 1]")
        self.fraction = float(fraction)
        k = self.keep(self.block_size)
        bits = k * (8 + 8 * self._index_bytes(self.block_size)) + 32
        self.info = CodecInfo(name=self.NAME, bits_per_value=bits / self.block_size, lossy=True, summable=False)

    def keep(self, length: int) -> int:
        """How many values a chunk of ``length`` values keeps."""
        return min(length, math.ceil(self.fraction * length))

    @staticmethod
    def _index_bytes(block_size: int) -> int:
        return 1 if block_size <= 256 else 2

    def _layout(self, numel: int, bs: int) -> tuple[int, int, int, int, int]:
        """(full chunks, tail length, k per full chunk, k of the tail, total kept)."""
        full, tail = divmod(numel, bs)
        k, kt = self.keep(bs), self.keep(tail) if tail else 0
        return full, tail, k, kt, full * k + kt

    def encode(self, tensor: torch.Tensor) -> bytes:
        flat = flat_float32(tensor)
        n, bs = flat.numel(), self.block_size
        full, tail, k, kt, total = self._layout(n, bs)
        nchunks, ib = full + (1 if tail else 0), self._index_bytes(bs)
        scales = torch.empty(nchunks)
        indices, values = torch.empty(total, dtype=torch.int64), torch.empty(total, dtype=torch.int8)
        pos = row = 0
        for start, stop in chunks(n, bs):
            m = (stop - start) // bs
            parts = [(flat[start: start + m * bs].view(m, bs), k)] if m else []
            if (stop - start) % bs:  # the partial last chunk
                parts.append((flat[start + m * bs: stop].view(1, tail), kt))
            for mat, keep in parts:
                idx = mat.abs().topk(keep, dim=1, sorted=False).indices.sort(dim=1).values
                q, s = quantize_blocks(mat.gather(1, idx), block_absmax(mat, self.NAME), LEVELS)
                indices[pos: pos + q.numel()] = idx.reshape(-1)
                values[pos: pos + q.numel()] = q.reshape(-1)
                scales[row: row + mat.shape[0]] = s
                pos, row = pos + q.numel(), row + mat.shape[0]
        index_bytes = indices.to(torch.uint8 if ib == 1 else torch.int16)  # int16 carries the uint16 bit pattern
        return b"".join([pack_header(CODEC_IDS[self.NAME], n, bs), scales.numpy().tobytes(),
                         index_bytes.numpy().tobytes(), values.numpy().tobytes()])

    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        bs = read_header(payload, CODEC_IDS[self.NAME], numel, self.NAME)
        full, tail, k, kt, total = self._layout(numel, bs)
        nchunks, ib = full + (1 if tail else 0), self._index_bytes(bs)
        o_idx = HEADER_SIZE + 4 * nchunks
        o_val = o_idx + ib * total
        check_length(payload, o_val + total, self.NAME)
        data = payload_tensor(payload)
        scales = data[HEADER_SIZE:o_idx].view(torch.float32)
        check_scales(scales, self.NAME, LEVELS)
        raw = data[o_idx:o_val]
        idx = raw.long() if ib == 1 else raw.view(torch.int16).long() & 0xFFFF
        q = data[o_val:].view(torch.int8)
        if total and int(q.min()) < -LEVELS:
            raise CodecError(f"{self.NAME}: level -128 is never produced by an honest encoder")
        out = torch.zeros(numel, dtype=torch.float32)
        for count, width, keep, c0, at in ((full, bs, k, 0, 0), (1 if tail else 0, tail, kt, full, full * k)):
            if count == 0:
                continue
            rows = idx[at: at + count * keep].view(count, keep)
            if int(rows.max()) >= width:
                raise CodecError(f"{self.NAME}: an index is outside its chunk of {width} values")
            if keep > 1 and not bool((rows[:, 1:] > rows[:, :-1]).all()):
                raise CodecError(f"{self.NAME}: indices within a chunk are not strictly increasing")
            vals = q[at: at + count * keep].view(count, keep) * scales[c0: c0 + count, None]
            out[c0 * bs: c0 * bs + count * width].view(count, width).scatter_(1, rows, vals)
        return out
