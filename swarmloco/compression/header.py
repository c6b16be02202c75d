"""Shared wire discipline of the blockwise codecs: a fixed header, strict validation, chunked work.

Every quantized payload starts with the same 16-byte little-endian header::

    magic u8 | version u8 | codec id u8 | reserved u8 (0) | numel u64 | block_size u32

so that a receiver rejects a confused or hostile payload (wrong codec, wrong tensor, absurd block size, wrong
length) *before* it allocates or computes anything; 16 bytes keep the float32 scales that follow it 4-byte
aligned, viewable in place. Encoding works on chunks of about a million values (whole blocks each), so the
float32 temporaries stay in cache and the allocator reuses them: the quantizers run at several GB/s on one core.
The blockwise quantizers (``int8``, ``int4``) share their setting (:class:`BlockSettings`) and their
construction (:class:`BlockwiseCodec`) here as well.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from swarmloco.checks import check, is_int
from swarmloco.compression.base import Codec, CodecError, CodecInfo, CodecSettings

MAGIC = 0x5C
VERSION = 1
HEADER = struct.Struct("<BBBBQI")
HEADER_SIZE = HEADER.size  # 16
MAX_BLOCK_SIZE = 65536
CHUNK_VALUES = 1 << 20
FLOAT32_MAX = float(torch.finfo(torch.float32).max)

MAX_ENCODABLE = FLOAT32_MAX / 2  # keeps every decoded level * scale finite

if sys.byteorder != "little":  # payloads are little-endian; views below assume a little-endian host
    raise ImportError("swarmloco codecs need a little-endian host")

CODEC_IDS = {"fp16": 1, "bf16": 2, "int8": 3, "int4": 4, "topk": 6, "rotate": 7, "rotate-hadamard": 8,
             "hadtopk": 9}
"""Id 5 is reserved: a top-k format (int8 values, plain indices) no codec here decodes. Its payloads are refused
as a wrong codec, so no codec may take the id."""


def check_block_size(block_size: int, name: str) -> int:
    """Validate a locally configured block size (the config only requires it to be positive)."""
    if not isinstance(block_size, int) or not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"config: codec.block_size={block_size!r} is invalid for {name}: "
                         f"must be in 1..{MAX_BLOCK_SIZE}")
    return block_size


@dataclass(frozen=True, kw_only=True)
class BlockSettings(CodecSettings):
    """The settings of the blockwise quantizers (``int8``, ``int4``)."""

    block_size: int = 256
    """Values per scale block for the blockwise quantizers (int8, int4)."""

    def __post_init__(self) -> None:
        check(is_int(self.block_size) and self.block_size > 0, "codec.block_size", self.block_size,
              "must be a positive integer")


class BlockwiseCodec(Codec):
    """A blockwise absmax quantizer (``int8``, ``int4``): ``BITS`` per value plus a float32 scale per block of
    ``block_size`` values."""

    NAME: str
    BITS: int
    settings_class = BlockSettings

    def __init__(self, block_size: int = BlockSettings.block_size):
        self.block_size = check_block_size(block_size, self.NAME)
        self.info = CodecInfo(name=self.NAME, bits_per_value=self.BITS + 32 / self.block_size, lossy=True,
                              summable=True)

    @classmethod
    def from_settings(cls, settings: BlockSettings) -> BlockwiseCodec:
        return cls(settings.block_size)


def pack_header(codec_id: int, numel: int, block_size: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, codec_id, 0, numel, block_size)


def read_header(payload: bytes, codec_id: int, numel: int, name: str) -> int:
    """Check the header of an untrusted payload against what we expect; return its block size."""
    if len(payload) < HEADER_SIZE:
        raise CodecError(f"{name}: payload has {len(payload)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, got_id, reserved, got_numel, block_size = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise CodecError(f"{name}: bad magic byte 0x{magic:02x}")
    if version != VERSION:
        raise CodecError(f"{name}: unsupported payload version {version}")
    if got_id != codec_id:
        raise CodecError(f"{name}: payload is codec id {got_id}, expected {codec_id}")
    if reserved != 0:
        raise CodecError(f"{name}: reserved header byte is {reserved}, expected 0")
    if got_numel != numel:
        raise CodecError(f"{name}: payload holds {got_numel} values, expected {numel}")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise CodecError(f"{name}: block_size {block_size} outside 1..{MAX_BLOCK_SIZE}")
    return block_size


def check_length(payload: bytes, expected: int, name: str) -> None:
    if len(payload) != expected:
        raise CodecError(f"{name}: payload has {len(payload)} bytes, expected {expected}")


def payload_tensor(payload: bytes) -> torch.Tensor:
    """The payload as a private, writable uint8 tensor (one cheap copy; never aliases the input)."""
    if len(payload) == 0:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8)


def check_scales(scales: torch.Tensor, name: str, max_level: int) -> None:
    """Scales must be finite, >= 0 and small enough that ``max_level * scale`` stays finite."""
    if scales.numel() == 0:
        return
    if not bool(torch.isfinite(scales).all()):
        raise CodecError(f"{name}: a block scale is NaN or Inf")
    lo, hi = torch.aminmax(scales)
    if float(lo) < 0:
        raise CodecError(f"{name}: a block scale is negative")
    if float(hi) * max_level > FLOAT32_MAX:
        raise CodecError(f"{name}: a block scale is so large that decoded values would overflow")


def check_levels(levels: torch.Tensor, name: str, max_level: float = float("inf")) -> None:
    """Per-chunk magnitudes of the 1- and 2-bit codecs: finite, >= 0 and at most ``max_level`` (above it, a
    chunk turned back, alone or in a mean, could overflow). Decoded values are +-level."""
    if levels.numel() == 0:
        return
    if not bool(torch.isfinite(levels).all()):
        raise CodecError(f"{name}: a level is NaN or Inf")
    lo, hi = torch.aminmax(levels)
    if float(lo) < 0:
        raise CodecError(f"{name}: a level is negative")
    if float(hi) > max_level:
        raise CodecError(f"{name}: a level is too large: the turned-back values would overflow")


def flat_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Any tensor as a contiguous 1-D float32 CPU tensor."""
    return tensor.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous()


def chunks(numel: int, block_size: int, multiple: int = 1) -> Iterator[tuple[int, int]]:
    """(start, stop) value ranges of about CHUNK_VALUES values covering whole blocks.

    Every chunk but the last holds a number of blocks that is a multiple of ``multiple``
    (the 4-bit codec needs an even count of values per chunk to pack pairs).
    """
    blocks = max(multiple, (CHUNK_VALUES // block_size) // multiple * multiple)
    step = blocks * block_size
    for start in range(0, numel, step):
        yield start, min(numel, start + step)


def as_blocks(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """A 1-D chunk as a (blocks, block_size) matrix, the last block zero-padded if partial."""
    rem = values.numel() % block_size
    if rem:
        values = torch.cat([values, values.new_zeros(block_size - rem)])
    return values.view(-1, block_size)


def block_absmax(blocks: torch.Tensor, name: str) -> torch.Tensor:
    """Per-row max |x| without materializing |x|; CodecError if the input holds NaN or Inf."""
    absmax = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg())
    if absmax.numel() and not bool(torch.isfinite(absmax).all()):
        raise CodecError(f"{name}: cannot encode a tensor holding NaN or Inf")
    if absmax.numel() and float(absmax.max()) > MAX_ENCODABLE:
        raise CodecError(f"{name}: cannot encode values beyond +-{MAX_ENCODABLE:.3g}")
    return absmax


def dequantize_into(q: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, block_size: int) -> None:
    """out[i] = q[i] * scales[i // block_size] for 1-D q and out of equal length (last block may be partial).

    Chunked like encoding: a single broadcast multiply over a huge int8 tensor is 2x slower.
    """
    for start, stop in chunks(q.numel(), block_size):
        full = (stop - start) // block_size
        b0, mid = start // block_size, start + full * block_size
        if full:
            torch.mul(q[start:mid].view(full, block_size), scales[b0: b0 + full, None],
                      out=out[start:mid].view(full, block_size))
        if stop > mid:
            torch.mul(q[mid:stop], scales[b0 + full], out=out[mid:stop])


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a float tensor holds no NaN/Inf, without allocating a mask (max/min propagate NaN)."""
    if tensor.numel() == 0:
        return True
    return bool(torch.isfinite(torch.maximum(tensor.amax(), tensor.amin().neg())))


def quantize_blocks(blocks: torch.Tensor, absmax: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round each row to integers in [-levels, levels] on its absmax grid: (int8 values, float32 scales).

    scale = absmax / levels and q = round(x / absmax * levels) (round half to even; all-zero rows give 0).
    Dividing by absmax first keeps |x / absmax| <= 1 finite even for subnormal absmax.
    """
    scales = absmax / levels
    denom = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    scaled = blocks / denom[:, None]
    scaled.mul_(levels).round_().clamp_(-levels, levels)
    return scaled.to(torch.int8), scales
