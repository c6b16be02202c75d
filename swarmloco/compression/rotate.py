"""A shared rotating share of the coordinates at one bit each: no indices, every peer sends the same ones.

Of each chunk of ``chunk`` values every peer sends every ``every``-th coordinate, starting at ``(phase + chunk
index) mod every`` with ``phase`` the round's outer step mod ``every`` (:meth:`for_round`), so the payloads of a
round line up without indices. A sent value is one sign bit; its magnitude is the chunk's mean |value| sent (one
bf16 level per chunk). The unsent rest stays in the peer's parameters (error feedback's ``in_model``); payloads
travel by all-gather (1-bit values do not survive a part-by-part sum). Why and how well: docs/codecs.md.

With ``basis = "hadamard"`` each whole chunk is first turned by :mod:`~swarmloco.compression.hadamard` and the
share is taken of its coefficients. Such payloads carry their own codec id (``rotate-hadamard``) and decode to
dense values averaged over the whole group (``CodecInfo.per_sender`` false); the plain basis averages each
coordinate over the peers that sent it.

Payload: 16-byte header (block_size = chunk) | u32 phase | bf16 levels [chunks] | sign bits (1: negative),
packed LSB first, chunk after chunk. The layout is fixed by the tensor's size and the phase; ``decode`` rejects
a wrong chunk, a phase >= ``every`` (bound to a round: any other than the round's), a wrong length, non-zero
padding bits and non-finite or negative levels (hadamard: also levels that could overflow when turned back).
"""

from __future__ import annotations

import copy
import struct
from dataclasses import dataclass

import torch

from swarmloco.checks import check, is_int, show_value
from swarmloco.compression.base import Codec, CodecError, CodecInfo, CodecSettings
from swarmloco.compression.bits import pack_bits, unpack_bits
from swarmloco.compression.hadamard import is_power_of_two, rotate_chunks, unrotate_chunks
from swarmloco.compression.header import (
    CODEC_IDS, HEADER_SIZE, MAX_BLOCK_SIZE, MAX_ENCODABLE, block_absmax, check_length, check_levels, flat_float32,
    pack_header, payload_tensor, read_header,
)

PHASE = struct.Struct("<I")
MAX_EVERY = 256
BASES = ("hadamard", "coords")


@dataclass(frozen=True, kw_only=True)
class RotateSettings(CodecSettings):
    """The ``rotate`` codec's settings."""

    rotate_every: int = 4
    """Each coordinate is sent once every this many rounds (a round sends 1 / rotate_every of them)."""
    rotate_chunk: int = 4096
    """Values per chunk (a multiple of rotate_every; a power of two with the hadamard basis); each chunk
    sends one bf16 level, and tensors shorter than a chunk are sent whole."""
    rotate_basis: str = "hadamard"
    """"hadamard" sends a share of each chunk's coefficients after a fixed random rotation (every value
    moves a little each round; the better one, BENCHMARKS.md), "coords" a share of the values themselves."""

    def __post_init__(self) -> None:
        check(is_int(self.rotate_every) and 1 <= self.rotate_every <= MAX_EVERY, "codec.rotate_every",
              self.rotate_every, f"must be an integer in 1..{MAX_EVERY}")
        check(is_int(self.rotate_chunk) and 1 <= self.rotate_chunk <= MAX_BLOCK_SIZE
              and self.rotate_chunk % self.rotate_every == 0, "codec.rotate_chunk", self.rotate_chunk,
              f"must be an integer in 1..{MAX_BLOCK_SIZE} and a multiple of rotate_every = {self.rotate_every}")
        check(self.rotate_basis in BASES, "codec.rotate_basis", self.rotate_basis,
              "must be " + " or ".join(map(show_value, BASES)))

    def check_use(self) -> None:
        """The hadamard basis turns chunks of 2^k values."""
        check(self.rotate_basis != "hadamard" or is_power_of_two(self.rotate_chunk),
              "codec.rotate_chunk", self.rotate_chunk, 'must be a power of two with rotate_basis = "hadamard"')


class RotateCodec(Codec):
    """Every ``every``-th value (``basis = "coords"``) or coefficient (``"hadamard"``) of each ``chunk``-value
    chunk, shifted by the round's phase; one sign bit each and one bf16 level per chunk."""

    NAME = "rotate"
    settings_class = RotateSettings

    def __init__(self, chunk: int = RotateSettings.rotate_chunk, every: int = RotateSettings.rotate_every,
                 basis: str = "coords"):
        if not isinstance(every, int) or not 1 <= every <= MAX_EVERY:
            raise ValueError(f"config: codec.rotate_every={every!r} is invalid: must be in 1..{MAX_EVERY}")
        if not isinstance(chunk, int) or not every <= chunk <= MAX_BLOCK_SIZE or chunk % every:
            raise ValueError(f"config: codec.rotate_chunk={chunk!r} is invalid: must be a multiple of "
                             f"rotate_every = {every} in {every}..{MAX_BLOCK_SIZE}")
        if basis not in BASES:
            raise ValueError(f"config: codec.rotate_basis={basis!r} is invalid: must be one of {', '.join(BASES)}")
        if basis == "hadamard" and not is_power_of_two(chunk):
            raise ValueError(f"config: codec.rotate_chunk={chunk!r} is invalid: must be a power of two with "
                             f'rotate_basis = "hadamard"')
        self.chunk, self.every, self.basis = chunk, every, basis
        self.codec_id = CODEC_IDS["rotate-hadamard" if basis == "hadamard" else self.NAME]
        self._max_level = MAX_ENCODABLE / (chunk // every) if basis == "hadamard" else float("inf")
        """Turning a chunk back sums up to ``chunk / every`` coefficients of one level: above this, a sum (or a
        mean of payloads) could overflow, so encode and decode refuse such levels."""
        self.phase: int | None = None
        """The round's phase (:meth:`for_round`): what ``encode`` sends and the only phase ``decode`` accepts;
        None (a codec not bound to a round) encodes phase 0 and decodes any."""
        self.info = CodecInfo(name=self.NAME, bits_per_value=(chunk // every + 16) / chunk, lossy=True, summable=False,
                              per_sender=basis == "coords", rest_in_model=True)

    @classmethod
    def from_settings(cls, settings: RotateSettings) -> RotateCodec:
        return cls(settings.rotate_chunk, settings.rotate_every, settings.rotate_basis)

    def for_round(self, step: int) -> RotateCodec:
        """This codec for the round of outer step ``step`` (its phase: ``step mod every``): it encodes that
        phase and refuses a payload of another (every member of a round is at the same outer step)."""
        bound = copy.copy(self)
        bound.phase = int(step) % self.every
        return bound

    # ----- layout -----------------------------------------------------------------------------
    def _chunks(self, numel: int) -> int:
        """How many chunks (and levels) a ``numel``-value tensor has (one if it is shorter than a chunk)."""
        return -(-numel // self.chunk)

    def _counts(self, numel: int, phase: int) -> torch.Tensor:
        """How many values each chunk sends at ``phase``."""
        if numel < self.chunk:
            return torch.tensor([numel] if numel else [], dtype=torch.int64)
        full, tail = divmod(numel, self.chunk)
        counts = [self.chunk // self.every] * full
        if tail:
            counts.append(len(range((phase + full) % self.every, tail, self.every)))
        return torch.tensor(counts, dtype=torch.int64)

    def sent_count(self, numel: int, phase: int | None = None) -> int:
        """How many values a ``numel``-value tensor's payload carries at ``phase`` (default: this codec's)."""
        return int(self._counts(numel, self._phase(phase)).sum())

    def sent_mask(self, numel: int, phase: int | None = None) -> torch.Tensor:
        """Which of the ``numel`` values are sent at ``phase`` (default: this codec's)."""
        phase = self._phase(phase)
        if numel < self.chunk:
            return torch.ones(numel, dtype=torch.bool)
        mask = torch.zeros(numel, dtype=torch.bool)
        full, tail = divmod(numel, self.chunk)
        if full:
            slots = mask[: full * self.chunk].view(full, self.chunk // self.every, self.every)
            offsets = (phase + torch.arange(full)) % self.every
            slots.scatter_(2, offsets.view(full, 1, 1).expand(full, self.chunk // self.every, 1), True)
        if tail:
            mask[full * self.chunk + (phase + full) % self.every:: self.every] = True
        return mask

    def payload_size(self, numel: int, phase: int | None = None) -> int:
        """Exact bytes of the payload of a ``numel``-value tensor at ``phase`` (default: this codec's)."""
        return HEADER_SIZE + PHASE.size + 2 * self._chunks(numel) + (self.sent_count(numel, phase) + 7) // 8

    def _phase(self, phase: int | None) -> int:
        return phase if phase is not None else self.phase or 0

    # ----- encoding ---------------------------------------------------------------------------
    def _sent_values(self, flat: torch.Tensor, phase: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the sent values in payload order, each one's chunk index)."""
        n = flat.numel()
        if n < self.chunk:
            return flat, torch.zeros(n, dtype=torch.int64)
        full = n // self.chunk
        parts, owners = [], []
        if full:
            mat = flat[: full * self.chunk].view(full, self.chunk // self.every, self.every)
            offsets = (phase + torch.arange(full)) % self.every
            idx = offsets.view(full, 1, 1).expand(full, self.chunk // self.every, 1)
            parts.append(mat.gather(2, idx).reshape(-1))
            owners.append(torch.arange(full).repeat_interleave(self.chunk // self.every))
        if n % self.chunk:
            off = (phase + full) % self.every
            tail = flat[full * self.chunk + off:: self.every]
            parts.append(tail)
            owners.append(torch.full((tail.numel(),), full, dtype=torch.int64))
        return torch.cat(parts), torch.cat(owners)

    def encode(self, tensor: torch.Tensor) -> bytes:
        flat = flat_float32(tensor)
        n = flat.numel()
        if n:
            block_absmax(flat.view(1, -1), self.NAME)  # NaN/Inf or overflowing input: CodecError
        if self.basis == "hadamard" and n >= self.chunk:
            flat = rotate_chunks(flat, self.chunk)
            block_absmax(flat.view(1, -1), self.NAME)  # turned, a huge input can overflow: CodecError
        phase = self._phase(None)
        values, owners = self._sent_values(flat, phase)
        rows = self._chunks(n)
        sums = torch.zeros(rows, dtype=torch.float64).index_add_(0, owners, values.abs().double())
        counts = torch.bincount(owners, minlength=rows).clamp_min(1).double()
        levels = (sums / counts).to(torch.bfloat16)
        if levels.numel() and float(levels.max()) > self._max_level:
            raise CodecError(f"{self.NAME}: input too large: its levels would overflow when turned back")
        signs = pack_bits((values < 0).to(torch.uint8))
        return b"".join([pack_header(self.codec_id, n, self.chunk), PHASE.pack(phase),
                         levels.view(torch.uint8).numpy().tobytes(), signs.numpy().tobytes()])

    # ----- decoding ---------------------------------------------------------------------------
    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        return self.finish_mean(self.decode_for_mean(payload, numel))

    def finish_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """Whole chunks turned back (hadamard basis; a new tensor), else ``mean`` itself."""
        return unrotate_chunks(mean, self.chunk) if self.basis == "hadamard" else mean

    def decode_for_mean(self, payload: bytes, numel: int) -> torch.Tensor:
        """The sent values (coords) or coefficients (hadamard: not turned back) at their places, 0 elsewhere."""
        chunk = read_header(payload, self.codec_id, numel, self.NAME)
        if chunk != self.chunk:
            raise CodecError(f"{self.NAME}: payload uses chunks of {chunk} values, this run {self.chunk}")
        if len(payload) < HEADER_SIZE + PHASE.size:
            raise CodecError(f"{self.NAME}: payload has {len(payload)} bytes, shorter than its header and phase")
        (phase,) = PHASE.unpack_from(payload, HEADER_SIZE)
        if phase >= self.every:
            raise CodecError(f"{self.NAME}: phase {phase} is not below rotate_every = {self.every}")
        if self.phase is not None and phase != self.phase:
            raise CodecError(f"{self.NAME}: payload for phase {phase}, this round's is {self.phase}")
        counts, rows = self._counts(numel, phase), self._chunks(numel)
        count = int(counts.sum())
        at = HEADER_SIZE + PHASE.size
        check_length(payload, at + 2 * rows + (count + 7) // 8, self.NAME)
        data = payload_tensor(payload)
        levels = data[at: at + 2 * rows].view(torch.bfloat16).float()
        check_levels(levels, self.NAME, self._max_level)
        negative = unpack_bits(data[at + 2 * rows:], count, self.NAME).bool()
        mag = levels[torch.repeat_interleave(torch.arange(rows), counts)]
        out = torch.zeros(numel, dtype=torch.float32)
        out[self.sent_mask(numel, phase)] = torch.where(negative, -mag, mag)
        return out


__all__ = ["RotateCodec", "RotateSettings"]
