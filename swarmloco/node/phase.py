"""The inner phase: what the training loop did since the last round, and when the next round is due.

A round is due after ``steps_per_round`` inner steps, or with ``outer.target_samples`` as soon as the live
peers at this outer step processed that many samples together (their heartbeats carry their counts).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InnerResult:
    """An inner phase that ended: its steps, the samples its round carries, its wall time and mean loss."""

    steps: int
    samples: int
    seconds: float
    mean_loss: float


class InnerPhase:
    """Counts of the current inner phase; ``samples_since_sync`` spans every phase since the last commit."""

    def __init__(self, steps_per_round: int, target_samples: int = 0):
        self.steps_per_round, self.target_samples = steps_per_round, target_samples
        self.inner_step = 0
        """Inner steps of this peer's schedule (moves to ``outer_step * steps_per_round`` on an adoption)."""
        self.steps = 0
        self.samples_since_sync = 0
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_n = 0
        self.started = time.perf_counter()
        self.blocked = 0.0
        """Seconds of this phase the training loop spent on a landing round."""
        self.last_landed = self.started
        """When the last round was reported (an overlapped round's time runs from landing to landing)."""
        self.samples_per_second = 0.0
        self.swarm_samples = 0
        """target_samples: the other live peers' samples at this outer step (from their heartbeats)."""
        self.target_reached = threading.Event()

    def count(self, samples: int, loss: torch.Tensor | float | None) -> None:
        """One inner step (the loss is summed on its device: no sync per step)."""
        self.steps += 1
        self.inner_step += 1
        self.samples_since_sync += int(samples)
        if loss is not None:
            self._loss_sum = self._loss_sum + (loss.detach().float() if isinstance(loss, torch.Tensor) else float(loss))
            self._loss_n += 1

    def due(self, counting_next: bool = False) -> bool:
        """Whether a round is due now (``counting_next``: after one more inner step)."""
        if not self.target_samples:
            return self.steps + (1 if counting_next else 0) >= self.steps_per_round
        return self.target_reached.is_set() or self.samples_since_sync + self.swarm_samples >= self.target_samples

    def result(self, in_flight_samples: int = 0) -> InnerResult:
        """The phase that just ended; its samples: those since the last commit that no round in flight carries."""
        seconds = time.perf_counter() - self.started
        mean = float(self._loss_sum) / self._loss_n if self._loss_n else float("nan")
        samples = self.samples_since_sync - in_flight_samples
        if self.steps and seconds > 0:
            self.samples_per_second = samples / seconds
        return InnerResult(self.steps, samples, seconds, mean)

    def restart(self) -> None:
        """A new phase starts now (its steps, samples and loss are counted afresh)."""
        self.steps, self._loss_sum, self._loss_n = 0, 0.0, 0
        self.target_reached.clear()
        self.swarm_samples = 0  # the others' count for this step comes with their next heartbeats
        self.started = time.perf_counter()
        self.blocked = 0.0

    def landed(self, samples: int) -> None:
        """A round carrying ``samples`` committed: they no longer wait for a round."""
        self.samples_since_sync -= samples


__all__ = ["InnerPhase", "InnerResult"]
