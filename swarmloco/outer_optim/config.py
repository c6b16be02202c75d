"""The outer step's settings: the ``[outer]`` section of a run (part of its manifest).

The outer optimizer (:mod:`~swarmloco.outer_optim.nesterov`) takes its defaults from here, so a run, the API
and a bare :class:`~swarmloco.outer_optim.nesterov.OuterNesterov` step alike where nothing is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swarmloco.checks import check, check_bool, check_in_range, check_positive, is_int, is_number, show_value
from swarmloco.compression.registry import CodecConfig

__all__ = ["OVERLAP_MODES", "OuterConfig"]

OVERLAP_MODES = ("none", "delayed", "eager")


@dataclass(frozen=True, kw_only=True)
class OuterConfig:
    """The outer optimizer: SGD with (Nesterov) momentum on the averaged pseudo-gradient."""

    lr: float = 1.0
    """Outer learning rate (DiLoCo's paper: 0.7; 1.0 with momentum 0.7 is the best of BENCHMARKS.md's grid
    at K=4, H=30, and meets the H=100 target). lr=1, momentum=0 is plain parameter averaging."""
    momentum: float = 0.7
    """Outer momentum (DiLoCo's paper: 0.9, which over-shoots at tens of rounds: BENCHMARKS.md)."""
    nesterov: bool = True
    """Nesterov momentum (DiLoCo) rather than heavy-ball."""
    target_samples: int = 0
    """Swarm-wide samples per outer step: a round starts when the live peers together processed this
    many since the last one (each weighted by its own samples), so slow peers contribute fewer inner
    steps instead of making everyone wait. 0: every peer runs inner.steps steps per round."""
    clip_factor: float = 4.0
    """Contributions are checked before they are averaged: a pseudo-gradient (part) whose norm exceeds
    clip_factor x the lower median of the group's is scaled down to it, and so is a claimed sample
    count (weight); applied when at least 3 peers of the group trained since the last round. 0 turns
    the check off (plain weighted mean)."""
    overlap: str = "none"
    """How a round overlaps the next inner steps: "none" (training waits for the round), "delayed" (training
    goes on from the local params while the round runs; its result lands overlap_steps later) or "eager"
    (as delayed, but the local params first take the outer step with this peer's own pseudo-gradient, and
    are corrected by the group's average when it lands; arXiv 2502.12996). ARCHITECTURE.md: the exact rules."""
    overlap_steps: int = 0
    """tau: a round's result is applied exactly this many inner steps after the round started (training
    waits there if it has not landed yet); 1 .. inner.steps. 0: as soon as it has landed (at the first inner
    step after its exchange ended; at the latest when its parameters are synced again, inner.steps after it
    started): no wait while rounds keep up with training, and no staleness beyond what the link costs. With
    fragments several rounds can be in flight (their exchanges run one after another). Only with overlap =
    "delayed" or "eager"."""
    overlap_alpha: float = 1.0
    """When a round lands, the local params become new_global + overlap_alpha x (local - proxy): the share
    of the inner progress made while the round ran that is kept (1: all of it; 0: restart from the new
    global params, torchft's fragment_update_alpha = 0)."""
    fragments: int = 1
    """Streaming DiLoCo (arXiv 2501.18512): the parameters are split into this many fragments of whole
    layers; a round every inner.steps / fragments inner steps syncs one of them in turn, so each fragment is
    synced every inner.steps steps and a round moves 1/fragments of the bytes. 1: every round syncs all."""

    @classmethod
    def for_codec(cls, codec: CodecConfig, **fields: Any) -> OuterConfig:
        """These outer settings, with ``lr`` and ``momentum`` the codec's tuning (``CodecInfo.outer``: ``hadtopk``'s
        1.6 / 0.6) where ``fields`` leave them unset, else the defaults."""
        return cls(**{**codec.outer_defaults, **fields})

    def __post_init__(self) -> None:
        check_positive("outer.lr", self.lr)
        check(is_number(self.clip_factor) and (self.clip_factor == 0 or self.clip_factor >= 1),
              "outer.clip_factor", self.clip_factor, "must be 0 (off) or a number >= 1")
        check(is_int(self.target_samples) and self.target_samples >= 0, "outer.target_samples",
              self.target_samples, "must be an integer >= 0")
        check_in_range("outer.momentum", self.momentum, 0.0, 1.0)
        check_bool("outer.nesterov", self.nesterov)
        check(not self.nesterov or self.momentum > 0, "outer.nesterov", self.nesterov, "needs momentum > 0")
        check(self.overlap in OVERLAP_MODES, "outer.overlap", self.overlap,
              f"must be one of {', '.join(map(show_value, OVERLAP_MODES))}")
        check(is_int(self.overlap_steps) and self.overlap_steps >= 0, "outer.overlap_steps", self.overlap_steps,
              "must be an integer >= 0")
        check(self.overlap != "none" or self.overlap_steps == 0, "outer.overlap_steps", self.overlap_steps,
              'needs overlap = "delayed" or "eager" (with overlap = "none" training waits for every round)')
        check_in_range("outer.overlap_alpha", self.overlap_alpha, 0.0, 1.0, closed_hi=True)
        check(is_int(self.fragments) and 1 <= self.fragments <= 256, "outer.fragments", self.fragments,
              "must be an integer from 1 to 256")
        check(self.overlap == "none" or not self.target_samples, "outer.overlap", self.overlap,
              "cannot be combined with target_samples yet (a round's size would depend on the overlap)")

    def check_inner_steps(self, inner_steps: int, field: str = "inner.steps") -> None:
        """The checks that need H: fragments divide it, overlap_steps at most H."""
        check(inner_steps % self.fragments == 0, field, inner_steps,
              f"must be a multiple of outer.fragments = {self.fragments} (a fragment is synced every "
              f"{field} steps, one every {field} / fragments)")
        check(self.overlap_steps <= inner_steps, "outer.overlap_steps", self.overlap_steps,
              f"must be at most {field} = {inner_steps} (a round lands before its parameters are synced again)")

    @property
    def overlapped(self) -> bool:
        """Rounds run behind the next inner steps (overlap "delayed" or "eager")."""
        return self.overlap != "none"

    def delay_steps(self, inner_steps: int) -> int:
        """tau: inner steps between a round's start and the moment its result is applied at the latest (0:
        blocking; with ``overlap_steps = 0`` ``inner_steps``, when its parameters are synced again)."""
        if not self.overlapped:
            return 0
        return self.overlap_steps or inner_steps
