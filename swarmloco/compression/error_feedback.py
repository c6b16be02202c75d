"""Error feedback: what compression dropped this round is added to the next round's pseudo-gradient.

A lossy codec C sends C(x) instead of x. Error feedback (Seide et al., 2014, "1-bit SGD"; Karimireddy et al.,
2019, "Error Feedback Fixes SignSGD") keeps the residual e = x - C(x) and compensates the next tensor,
x' = g + e: what is sent over T rounds sums to the true tensors minus the last residual, so nothing is lost,
only delayed. ``decay`` < 1 (SparseLoCo's beta) shrinks old residuals before they are re-added. Per outer
step and tensor ``i``::

    compensated = ef.compensate(i, pseudo_grad)
    payload = codec.encode(compensated)
    ef.update(i, compensated, codec.decode(payload, compensated.numel()).view_as(compensated))

**Rest in the model** (``in_model``; ``rotate``, ``hadtopk``): the residual stays in the peer's own parameters
instead, which after the outer step are the new global ones minus it (:meth:`ErrorFeedback.rest`), so the next
pseudo-gradient ``global - local`` carries it and the model trains on from where it was (an accumulator outside
the parameters re-adds what the model re-learned; BENCHMARKS.md, "Where the sparse gap comes from");
``compensate`` then returns the tensor unchanged. The residuals are part of a peer's state: ``state_dict`` /
``load_state_dict`` put them in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import torch

from swarmloco.compression.base import Codec
from swarmloco.compression.registry import CodecConfig


class ErrorFeedback:
    """Residuals keyed by tensor name or index (``in_model``: kept in the peer's parameters, see the module doc)."""

    def __init__(self, decay: float = 1.0, in_model: bool = False):
        if not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
            raise ValueError(f"error feedback decay={decay!r} is invalid: must be in [0, 1]")
        self.decay, self.in_model = float(decay), bool(in_model)
        self.residuals: dict[Hashable, torch.Tensor] = {}

    def compensate(self, key: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor + decay * residual`` (a new float32 tensor; ``tensor`` itself is not modified); ``tensor``
        as it is with the rest in the model (the parameters hold the residual already)."""
        out = tensor.detach().to(torch.float32).clone()
        residual = None if self.in_model else self.residuals.get(key)
        if residual is not None:
            if residual.shape != out.shape:
                raise ValueError(f"error feedback: residual {key!r} has shape {tuple(residual.shape)}, "
                                 f"tensor has {tuple(out.shape)}")
            out.add_(residual.to(out.device), alpha=self.decay)
        return out

    def update(self, key: Hashable, compensated: torch.Tensor, sent_decoded: torch.Tensor) -> None:
        """Remember what was not sent: ``compensated - sent_decoded``."""
        if compensated.numel() != sent_decoded.numel():
            raise ValueError(f"error feedback: {key!r} sent {sent_decoded.numel()} values for {compensated.numel()}")
        sent = sent_decoded.detach().to(device=compensated.device, dtype=torch.float32).reshape(compensated.shape)
        self.residuals[key] = compensated.detach().to(torch.float32) - sent

    def rest(self, key: Hashable) -> torch.Tensor | None:
        """What the last round did not send of tensor ``key`` (None if nothing is kept): with the rest in the
        model, the peer's parameters are the new global ones minus it."""
        return self.residuals.get(key)

    def reset(self) -> None:
        """Forget all residuals (e.g. after adopting another peer's parameters)."""
        self.residuals.clear()

    def residual_norm(self) -> float:
        """L2 norm of all residuals together, for logs."""
        return math.sqrt(sum(float(r.double().square().sum()) for r in self.residuals.values()))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "in_model": self.in_model,
                "residuals": {k: r.detach().cpu().clone() for k, r in self.residuals.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore residuals; ValueError (nothing changed) if the state is malformed."""
        residuals = state.get("residuals") if isinstance(state, dict) else None
        if not isinstance(residuals, dict):
            raise ValueError("error feedback state: missing 'residuals' mapping")
        loaded = {}
        for key, value in residuals.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ValueError(f"error feedback state: residual {key!r} is not a float tensor")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"error feedback state: residual {key!r} holds NaN or Inf")
            loaded[key] = value.detach().to(torch.float32).clone()
        decay = state.get("decay", self.decay)
        if not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
            raise ValueError(f"error feedback state: decay={decay!r} is invalid")
        self.decay, self.residuals = float(decay), loaded


def error_feedback_for(cfg: CodecConfig, codec: Codec) -> ErrorFeedback | None:
    """The error feedback a peer of a run with codec config ``cfg`` and its ``codec`` keeps, or None (off, or
    lossless).

    The codec's settings say how fast the accumulator decays (``CodecSettings.feedback_decay``: ``topk``'s
    ``topk_decay``, SparseLoCo's beta; the others' 1.0, every dropped bit is sent later), its info whether the
    rest stays in the peer's parameters (``in_model``: ``CodecInfo.rest_in_model``, ``rotate`` and ``hadtopk``).
    The peer and the simulator both build it here.
    """
    if not (cfg.error_feedback and codec.info.lossy):
        return None
    return ErrorFeedback(decay=cfg.settings.feedback_decay, in_model=codec.info.rest_in_model)
