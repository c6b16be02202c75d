"""State download: what a peer serves, and the checks on what arrives.

A peer adopts another's state whenever the fork choice (:mod:`swarmloco.node.lineage`) says the other's
lineage outweighs its own: a late joiner, a restart older than the swarm, a peer whose round failed
while its group committed, a peer woken from SIGSTOP, the lighter side of a partition or a loner that
meets the swarm. :mod:`swarmloco.node.catch_up` checks the lineage first, then downloads the state.

The state (:func:`pack_state`) is the global parameters and the outer optimizer's momentum, both fp32,
plus msgpack metadata (manifest hash, outer step, digest). What arrives is checked
(:func:`unpack_state`) before it is adopted: same manifest, the expected count, shapes and dtypes,
finite values, and a digest recomputed from the bytes equal to the one claimed (the catch-up then
requires that digest to be on the proven lineage). A source that fails any check is named in a
one-line error and the next one is tried.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


STATE_VERSION = 1
SERVING_STATES = ("training", "ready", "averaging", "idle")
"""States in which a peer holds agreed global parameters it can serve ("joining" ones may not yet)."""
DIGEST_CHARS = 16


class StateError(ValueError):
    """A downloaded state is unusable for this run (the message says why, in one line)."""


def params_digest(params: Iterable[torch.Tensor]) -> str:
    """sha256 of the exact bytes of a parameter list (replicas in sync have equal digests)."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())  # (its memory, not a copy)
    return h.hexdigest()


def pack_state(params: Sequence[torch.Tensor], momentum: Sequence[torch.Tensor | None], outer_step: int,
               manifest_hash: str, digest: str) -> tuple[dict, list[torch.Tensor]]:
    """What this peer serves: metadata plus params followed by momentum buffers (zeros if none yet)."""
    has_momentum = all(m is not None for m in momentum)
    tensors = [p.detach().clone() for p in params]
    tensors += [m.detach().clone() if has_momentum else torch.zeros_like(p) for m, p in zip(momentum, params)]
    metadata = {"v": STATE_VERSION, "manifest_hash": manifest_hash, "outer_step": int(outer_step),
                "digest": digest, "has_momentum": bool(has_momentum)}
    return metadata, tensors


@dataclass(frozen=True)
class AdoptedState:
    outer_step: int
    digest: str
    params: list[torch.Tensor]
    momentum: list[torch.Tensor] | None


def unpack_state(metadata, tensors: Sequence[torch.Tensor], *, manifest_hash: str,
                 templates: Sequence[torch.Tensor], min_step: int = 0) -> AdoptedState:
    """Check a downloaded state against this run; StateError names the first problem."""
    if not isinstance(metadata, dict) or metadata.get("v") != STATE_VERSION:
        raise StateError("state metadata is malformed or of another version")
    if metadata.get("manifest_hash") != manifest_hash:
        raise StateError(f"state belongs to manifest {str(metadata.get('manifest_hash'))[:12]}, "
                         f"this run is {manifest_hash[:12]}")
    step, claimed = metadata.get("outer_step"), metadata.get("digest")
    if not isinstance(step, int) or step < 0 or not isinstance(claimed, str):
        raise StateError("state metadata lacks a valid outer_step or digest")
    if step < min_step:
        raise StateError(f"state is at outer step {step}, older than the {min_step} its lineage proves")
    n = len(templates)
    if len(tensors) != 2 * n:
        raise StateError(f"state has {len(tensors)} tensors, this model needs {2 * n}")
    for i, (t, ref) in enumerate(zip(tensors, list(templates) * 2)):
        if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != torch.float32:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise StateError(f"state tensor {i} is {got}, expected {tuple(ref.shape)} float32")
        if not bool(torch.isfinite(t).all()):
            raise StateError(f"state tensor {i} holds NaN/Inf")
    params, momentum = [t.contiguous() for t in tensors[:n]], [t.contiguous() for t in tensors[n:]]
    digest = params_digest(params)
    if digest != claimed:
        raise StateError(f"state digest {digest[:12]} does not match the claimed {claimed[:12]}")
    return AdoptedState(step, digest, params, momentum if metadata.get("has_momentum") else None)


def state_bytes(templates: Sequence[torch.Tensor]) -> int:
    """Bytes of a state on the wire (params and momentum in fp32), before framing."""
    return 2 * 4 * sum(t.numel() for t in templates)


__all__ = ["AdoptedState", "StateError", "pack_state", "params_digest", "state_bytes", "unpack_state"]
