"""Uncompressed float32: the reference codec."""

from __future__ import annotations

import torch

from swarmloco.compression.base import Codec, CodecError, CodecInfo, check_finite


class Float32Codec(Codec):
    """Raw little-endian float32 values."""

    info = CodecInfo(name="none", bits_per_value=32.0, lossy=False, summable=True)

    def encode(self, tensor: torch.Tensor) -> bytes:
        return tensor.detach().reshape(-1).to(torch.float32).contiguous().numpy().tobytes()

    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        if len(payload) != 4 * numel:
            raise CodecError(f"none: payload has {len(payload)} bytes, expected {4 * numel} for {numel} values")
        out = torch.frombuffer(bytearray(payload), dtype=torch.float32) if numel else torch.zeros(0)
        check_finite(out, "none")
        return out
