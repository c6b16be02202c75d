"""A fixed random rotation of each chunk: random signs, then the orthonormal Walsh-Hadamard transform.

``rotate(rows) = H (d * rows) / sqrt(n)`` for rows of ``n`` values (``n`` a power of two), where ``H`` is the
Sylvester-Hadamard matrix and ``d`` a fixed pseudo-random sign per position; ``unrotate`` inverts it (``H`` is
symmetric and ``H H = n I``). A chunk's coefficients in this basis are mixtures of all its values, so
quantizing them to one bit each loses less than quantizing the values themselves (QuaRot, QuIP#: the rotation
spreads outliers), and sending a quarter of them updates every value a little instead of a quarter of the
values fully (the ``rotate`` codec's ``hadamard`` basis).

Computed with ``log2(n)`` butterflies of additions and subtractions (no matrix product): each is one correctly
rounded IEEE operation, so every peer gets the same bits on any CPU or GPU, which the swarm's bit-identical
global state needs. The signs come from SHAKE-128 of a fixed label, not from a torch generator, so they cannot
change with a torch release.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch

LABEL = b"swarmloco rotate signs v1"


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@lru_cache(maxsize=8)
def signs(n: int) -> torch.Tensor:
    """The fixed sign (+1.0 or -1.0) of each of ``n`` positions: bit ``i`` of SHAKE-128(LABEL)."""
    raw = torch.frombuffer(bytearray(hashlib.shake_128(LABEL).digest((n + 7) // 8)), dtype=torch.uint8)
    bits = (raw.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return 1.0 - 2.0 * bits.reshape(-1)[:n].to(torch.float32)


def _butterflies_(rows: torch.Tensor) -> torch.Tensor:
    """``rows @ H`` (unnormalized), in place, for contiguous float32 rows of a power-of-two length."""
    count, n = rows.shape
    h = 1
    while h < n:
        pairs = rows.view(count, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0, :], pairs[:, :, 1, :]
        first = a.clone()
        a.add_(b)
        torch.sub(first, b, out=b)
        h *= 2
    return rows


def _check(n: int) -> None:
    if not is_power_of_two(n):
        raise ValueError(f"hadamard: rows of {n} values; the length must be a power of two")


def rotate(rows: torch.Tensor) -> torch.Tensor:
    """Each row (float32, power-of-two length) in the rotated basis; norms are kept. A new tensor."""
    _check(rows.shape[-1])
    n = rows.shape[-1]
    return _butterflies_((rows * signs(n).to(rows.device)).reshape(-1, n)).mul_(1.0 / n ** 0.5).view_as(rows)


def unrotate(coefficients: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rotate`. A new tensor."""
    _check(coefficients.shape[-1])
    n = coefficients.shape[-1]
    rows = _butterflies_(coefficients.reshape(-1, n).clone())
    return rows.mul_(1.0 / n ** 0.5).mul_(signs(n).to(rows.device)).view_as(coefficients)


def rotate_chunks(flat: torch.Tensor, chunk: int) -> torch.Tensor:
    """``flat`` with each whole ``chunk`` of values turned, the tail as it is (a new tensor; ``flat`` itself when
    it has no whole chunk)."""
    full = flat.numel() // chunk * chunk
    if not full:
        return flat
    return torch.cat((rotate(flat[:full].view(-1, chunk)).view(-1), flat[full:]))


def unrotate_chunks(flat: torch.Tensor, chunk: int) -> torch.Tensor:
    """The inverse of :func:`rotate_chunks`."""
    full = flat.numel() // chunk * chunk
    if not full:
        return flat
    return torch.cat((unrotate(flat[:full].view(-1, chunk)).view(-1), flat[full:]))


__all__ = ["is_power_of_two", "rotate", "rotate_chunks", "signs", "unrotate", "unrotate_chunks"]
