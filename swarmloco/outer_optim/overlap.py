"""Rounds that run behind the next inner steps, and streaming fragments: the update rules as tensor math.

The peer (:mod:`swarmloco.node.overlapped`) and the simulator (:mod:`swarmloco.sim.simulate`) both use these
functions, so a swarm and its simulation follow one rule; ARCHITECTURE.md, "Rounds behind training, and
streaming fragments", gives the why. For one round of one peer over the parameters it syncs: ``theta`` the
global parameters at its start, ``local`` the peer's own, ``delta = theta - local``, ``avg`` the group's
average. The proxy ``p`` is ``local`` (``outer.overlap = "delayed"``) or, for ``"eager"`` (Kale et al. 2025,
arXiv 2502.12996), ``outer_step(theta, delta)`` without touching the optimizer's state (:func:`proxy_step`),
and ``local := p`` at once. The round lands ``tau = outer.overlap_steps`` inner steps after its start (0: once
it arrived), with ``T = outer_step(theta, avg)`` if it committed, else ``T = theta - delta`` (as if it had not
run), and, with ``alpha = outer.overlap_alpha``,

    local := alpha * local + (T - alpha * p)        (= T + alpha * (local - p))

**Fragments** (Streaming DiLoCo, arXiv 2501.18512): ``F`` fragments of whole layers (:func:`fragment_partition`);
the round of outer step ``s`` syncs fragment ``s mod F`` (:func:`round_fragment`), one every ``H / F`` steps.
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
