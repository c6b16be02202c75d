"""Half-precision codecs: fp16 and bf16, 16 bits per value, no header.

The simplest 2x saving, and the usual wire format of mixed-precision all-reduce; INTELLECT-1
(Jaghouar et al., 2024) goes further for DiLoCo pseudo-gradients with int8 (:mod:`int8`).
fp16 keeps 11 significant bits but overflows beyond 65504, so values are clamped to +-65504 first
(pseudo-gradients are far smaller; the clamp only guarantees a finite payload). bf16 keeps float32's
range with 8 significant bits.
Relative error per value: <= 2^-11 for fp16 (normal range), <= 2^-8 for bf16 (round to nearest even).

Payload: ``numel`` little-endian 16-bit floats, nothing else; ``decode`` checks the length exactly
and rejects NaN/Inf (a hostile peer can write those bit patterns).
"""

from __future__ import annotations

import torch

from swarmloco.compression.base import Codec, CodecError, CodecInfo
from swarmloco.compression.header import CHUNK_VALUES, all_finite, check_length, flat_float32, payload_tensor


class _HalfCodec(Codec):
    NAME: str
    DTYPE: torch.dtype

    def __init__(self) -> None:
        self.info = CodecInfo(name=self.NAME, bits_per_value=16.0, lossy=True, summable=True)
        self.limit = float(torch.finfo(self.DTYPE).max)

    def encode(self, tensor: torch.Tensor) -> bytes:
        flat = flat_float32(tensor)
        if not all_finite(flat):
            raise CodecError(f"{self.NAME}: cannot encode a tensor holding NaN or Inf")
        half = torch.empty(flat.numel(), dtype=self.DTYPE)
        for start in range(0, flat.numel(), CHUNK_VALUES):  # chunks keep the clamped temporary in cache
            half[start: start + CHUNK_VALUES] = flat[start: start + CHUNK_VALUES].clamp(-self.limit, self.limit)
        return half.view(torch.int16).numpy().tobytes()

    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        check_length(payload, 2 * numel, self.NAME)
        out = payload_tensor(payload).view(torch.int16).view(self.DTYPE).to(torch.float32)
        if not all_finite(out):
            raise CodecError(f"{self.NAME}: decoded values contain NaN or Inf")
        return out


class Float16Codec(_HalfCodec):
    """IEEE half precision, clamped to +-65504."""

    NAME, DTYPE = "fp16", torch.float16


class BFloat16Codec(_HalfCodec):
    """bfloat16: float32's exponent range, 8 significant bits."""

    NAME, DTYPE = "bf16", torch.bfloat16
