"""Rounds that run behind the next inner steps, and streaming fragments: the update rules as tensor math.

The peer (:mod:`swarmloco.node.overlapped`) and the simulator (:mod:`swarmloco.sim.simulate`) both use these
functions, so a swarm and its simulation follow one rule. For one round of one peer, over the parameters it
syncs (all of them, or one fragment): ``theta`` the global parameters when the round starts, ``local`` the
peer's own parameters at that moment, ``delta = theta - local`` its pseudo-gradient, ``avg`` the group's
average of the deltas, ``tau`` = ``outer.overlap_steps``, ``alpha`` = ``outer.overlap_alpha``.

* ``overlap = "none"``: training waits; ``theta' = outer_step(theta, avg)``; ``local := theta'``.
* ``"delayed"``: the proxy ``p = local`` (training goes on from the peer's own parameters).
* ``"eager"`` (after Kale et al. 2025, arXiv 2502.12996): ``p = outer_step(theta, delta)`` computed without
  changing the outer optimizer's state (:func:`proxy_step`): this peer's own pseudo-gradient stands in for the
  average not known yet, and ``local := p`` at once.

Exactly ``tau`` inner steps after the round started (training waits there if it has not landed yet; with
``overlap_steps = 0`` the peer lands it as soon as it has arrived, at the latest ``H`` steps after, when its
parameters are synced again: with fragments several rounds can be in flight, one per fragment) the
round lands: ``T = theta' = outer_step(theta, avg)`` if it committed (the certified global state, identical
on every peer), else ``T = theta - delta`` (the local parameters at the round's start: as if the round had not
run, so the next pseudo-gradient carries this one's progress, as in a blocking round that failed), and

    local := alpha * local + (T - alpha * p)        (= T + alpha * (local - p))

``alpha = 1`` keeps every inner step taken while the round ran (moved by the correction ``T - p``);
``alpha = 0`` restarts from ``T`` (torchft's ``fragment_update_alpha = 0``; Streaming DiLoCo mixes the new
global parameters with the local ones, we mix them with the corrected local ones).

**Fragments** (Douillard et al. 2025, Streaming DiLoCo, arXiv 2501.18512): the parameters are cut into
``F`` fragments of whole layers (:func:`fragment_partition`); round ``s`` syncs fragment ``s mod F``, a round
starts every ``H / F`` inner steps, so each fragment is synced every ``H`` steps and the peak traffic is
``1 / F`` of a full round.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["apply_correction", "fragment_partition", "landing_correction", "layer_key", "proxy_step",
           "round_fragment"]


@torch.no_grad()
def proxy_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
               grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """What one step of ``optimizer`` (an :class:`~swarmloco.outer_optim.OuterNesterov`) on ``params`` with
    ``grads`` would give, as new tensors, with the same operations as its ``step`` (so a peer alone, whose
    average is its own pseudo-gradient, lands with a correction of exactly zero); nothing is changed."""
    group = optimizer.param_groups[0]
    lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
    out = []
    for p, g in zip(params, grads):
        g = g.to(device=p.device, dtype=p.dtype)
        if momentum != 0:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            buf = torch.clone(g) if buf is None else buf.mul(momentum).add_(g)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        out.append(p.add(g, alpha=-lr))
    return out


@torch.no_grad()
def landing_correction(target: Sequence[torch.Tensor], proxy: Sequence[torch.Tensor], alpha: float,
                       out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``T - alpha * p`` per tensor (into ``out`` when given, which may be ``proxy`` itself)."""
    if out is None:
        return [torch.sub(t, p, alpha=alpha) for t, p in zip(target, proxy)]
    for o, t, p in zip(out, target, proxy):
        torch.sub(t, p, alpha=alpha, out=o)
    return list(out)


@torch.no_grad()
def apply_correction(local: torch.Tensor, correction: torch.Tensor, alpha: float) -> None:
    """``local := alpha * local + correction`` in place (``correction`` from :func:`landing_correction`)."""
    if alpha != 1.0:
        local.mul_(alpha)
    local.add_(correction.to(device=local.device, dtype=local.dtype, non_blocking=True))


def round_fragment(outer_step: int, fragments: int) -> int:
    """The fragment that the round of ``outer_step`` syncs (every peer of the round agrees: same step)."""
    return outer_step % fragments


def layer_key(name: str) -> str:
    """The layer a parameter belongs to: its name up to the first numeric part (``transformer.h.3``,
    ``model.layers.0``, ``0`` in a Sequential), else its module (``transformer.wte``, ``lm_head``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def fragment_partition(names: Sequence[str], numels: Sequence[int], fragments: int) -> tuple[tuple[int, ...], ...]:
    """Parameter indices of each fragment: whole layers (:func:`layer_key`), balanced by size (the largest
    layer first, into the lightest fragment; ties to the lower index), each fragment in model order.
    Deterministic: every peer of a run (same fingerprint) cuts the model alike."""
    if len(names) != len(numels):
        raise ValueError(f"{len(names)} names but {len(numels)} sizes")
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(layer_key(name), []).append(i)
    if fragments > len(groups):
        raise ValueError(f"outer.fragments = {fragments} is invalid: the model has only {len(groups)} layer(s) "
                         "to split into fragments of whole layers")
    ordered = sorted(groups.values(), key=lambda idx: (-sum(numels[i] for i in idx), idx[0]))
    load, members = [0] * fragments, [[] for _ in range(fragments)]
    for idx in ordered:
        f = min(range(fragments), key=lambda k: (load[k], k))
        load[f] += sum(numels[i] for i in idx)
        members[f].extend(idx)
    return tuple(tuple(sorted(m)) for m in members)
