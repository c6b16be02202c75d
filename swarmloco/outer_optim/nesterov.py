"""The DiLoCo outer optimizer: SGD with Nesterov momentum over the global parameters.

The averaged pseudo-gradient (global params minus the locally trained params, averaged over the round's peers)
is put into ``.grad`` of the global parameters and one step is taken, as in DiLoCo (Douillard et al. 2023,
arXiv:2311.08105) and torchft's ``DiLoCo.perform_sync``. Update (identical, operation for operation, to
``torch.optim.SGD(nesterov=True, foreach=False)`` with no dampening or weight decay)::

    buf = g                     (first step)      buf = momentum * buf + g   (later steps)
    d   = g + momentum * buf    (nesterov)        d   = buf                  (heavy ball)
    p   = p - lr * d

With lr=1 and momentum=0 the step sets p to the mean of the peers' local params (federated averaging). It runs
on whatever device the params are on; the node keeps the global params on the CPU in fp32 so every peer
computes bit-identical results.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from swarmloco.outer_optim.config import OuterConfig


class OuterNesterov(torch.optim.Optimizer):
    """SGD with (Nesterov) momentum; ``.grad`` holds the averaged pseudo-gradient. Its defaults are a run's
    (:class:`~swarmloco.outer_optim.config.OuterConfig`)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = OuterConfig.lr,
                 momentum: float = OuterConfig.momentum, nesterov: bool = OuterConfig.nesterov):
        if not lr > 0:
            raise ValueError(f"outer lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim interface
        if closure is not None:
            raise ValueError("the outer step takes no closure: the pseudo-gradient is already in .grad")
        for group in self.param_groups:
            lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(g).detach()
                    else:
                        buf.mul_(momentum).add_(g)
                    g = g.add(buf, alpha=momentum) if nesterov else buf
                p.add_(g, alpha=-lr)
        return None


def apply_outer_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                     pseudo_grads: Sequence[torch.Tensor]) -> None:
    """Put ``pseudo_grads`` into ``params[i].grad``, step, and clear the grads."""
    if len(params) != len(pseudo_grads):
        raise ValueError(f"{len(params)} params but {len(pseudo_grads)} pseudo-gradients")
    for p, g in zip(params, pseudo_grads):
        if p.shape != g.shape:
            raise ValueError(f"pseudo-gradient shape {tuple(g.shape)} != param shape {tuple(p.shape)}")
        p.grad = g.to(device=p.device, dtype=p.dtype)
    optimizer.step()
    for p in params:
        p.grad = None


def build_outer_optimizer(params: Sequence[torch.Tensor], cfg: OuterConfig) -> OuterNesterov:
    """The outer optimizer of a run's ``[outer]`` config.

    The one constructor of the outer step: the peer (``node/diloco.py``) and the simulator
    (``sim/simulate.py``) both call it, so a swarm and its simulation apply the same update rule.
    """
    return OuterNesterov(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
