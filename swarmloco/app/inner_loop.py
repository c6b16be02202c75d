"""The built-in inner loop: AdamW steps on the peer's own data, on its own device.

Inner optimizer state stays local across rounds (DiLoCo keeps it; only parameters are synced).
The learning rate follows linear warmup then cosine decay over ``inner.total_steps`` counted in
this peer's inner steps. On CUDA the forward pass runs under bf16 autocast, and the loss is checked
for NaN/Inf every ``FINITE_CHECK_EVERY`` steps (each check waits for the GPU) and at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from swarmloco.config import InnerConfig

FINITE_CHECK_EVERY = 16


def inner_lr(cfg: InnerConfig, step: int) -> float:
    """Learning rate at inner step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio*lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def inner_optimizer(model: torch.nn.Module, cfg: InnerConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only (biases and norms are not decayed)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=device.type == "cuda",
    )


@dataclass
class InnerResult:
    """What one stretch of inner steps did."""

    steps: int
    samples: int
    mean_loss: float
    seconds: float


class InnerTrainer:
    """The built-in inner steps: lr schedule, bf16 autocast on CUDA, grad clipping; one at a time
    (:meth:`step`, the CLI's peer) or a stretch of them (:meth:`train`, the simulator)."""

    def __init__(self, model: torch.nn.Module, cfg: InnerConfig, device: torch.device,
                 optimizer: torch.optim.Optimizer | None = None, loss_fn=None):
        """``loss_fn(model, x, y)``: the scalar training loss (default: the byte GPT's own)."""
        self.model, self.cfg, self.device = model, cfg, device
        self.optimizer = optimizer or inner_optimizer(model, cfg, device)
        self.loss_fn = loss_fn or (lambda m, x, y: m(x, y)[1])
        self.autocast = device.type == "cuda"
        self.step_count = 0
        """Steps :meth:`train` took (its learning-rate schedule's position)."""
        self._steps = 0

    def step(self, x: torch.Tensor, y: torch.Tensor, schedule_step: int) -> torch.Tensor:
        """One AdamW step at the learning rate of inner step ``schedule_step``; the loss, detached."""
        self.model.train()
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        lr = inner_lr(self.cfg, schedule_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss_fn(self.model, x, y)
        # reading the loss waits for the GPU: on CUDA look every few steps (a NaN model stays NaN)
        if (not self.autocast or self._steps % FINITE_CHECK_EVERY == 0) and not torch.isfinite(loss):
            raise FloatingPointError(f"inner loss is {loss.item()} at inner step {schedule_step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self._steps += 1
        return loss.detach()

    def train(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], max_steps: int,
              should_stop=lambda: False, on_step=lambda step: None) -> InnerResult:
        """Run up to ``max_steps`` inner steps (fewer if ``should_stop()`` turns true)."""
        start, losses, samples, steps = time.perf_counter(), [], 0, 0
        for _ in range(max_steps):
            if should_stop():
                break
            x, y = next(batches)
            losses.append(self.step(x, y, self.step_count))
            samples += x.shape[0]
            steps += 1
            self.step_count += 1
            on_step(steps)
        mean = float(torch.stack(losses).float().mean()) if losses else float("nan")
        if losses and not math.isfinite(float(losses[-1])):
            raise FloatingPointError(f"inner loss is {float(losses[-1])} at inner step {self.step_count - 1}")
        return InnerResult(steps=steps, samples=samples, mean_loss=mean, seconds=time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             loss_fn=None) -> float:
    """Mean held-out loss over fixed batches."""
    loss_fn = loss_fn or (lambda m, x, y: m(x, y)[1])
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model, x.to(device), y.to(device))
        total += float(loss)
    model.train(was_training)
    return total / max(1, len(batches))
