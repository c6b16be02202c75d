"""The inner loop: H steps of AdamW on the peer's own data, on its own device.

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


@dataclass
class InnerResult:
    """What one stretch of inner steps did."""

    steps: int
    samples: int
    mean_loss: float
    seconds: float


class InnerTrainer:
    """Owns the local model copy and its AdamW state."""

    def __init__(self, model: torch.nn.Module, cfg: InnerConfig, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=device.type == "cuda",
        )
        self.step_count = 0
        self.autocast = device.type == "cuda"

    def train(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], max_steps: int,
              should_stop=lambda: False, on_step=lambda step: None) -> InnerResult:
        """Run up to ``max_steps`` inner steps (fewer if ``should_stop()`` turns true)."""
        self.model.train()
        start, losses, samples, steps = time.perf_counter(), [], 0, 0
        for _ in range(max_steps):
            if should_stop():
                break
            x, y = next(batches)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            lr = inner_lr(self.cfg, self.step_count)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                _, loss = self.model(x, y)
            # reading the loss waits for the GPU: on CUDA look every few steps (a NaN model stays NaN)
            if (not self.autocast or steps % FINITE_CHECK_EVERY == 0) and not torch.isfinite(loss):
                raise FloatingPointError(f"inner loss is {loss.item()} at inner step {self.step_count}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            losses.append(loss.detach())
            samples += x.shape[0]
            steps += 1
            self.step_count += 1
            on_step(steps)
        mean = float(torch.stack(losses).float().mean()) if losses else float("nan")
        if losses and not math.isfinite(float(losses[-1])):
            raise FloatingPointError(f"inner loss is {float(losses[-1])} at inner step {self.step_count - 1}")
        return InnerResult(steps=steps, samples=samples, mean_loss=mean, seconds=time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Mean held-out loss over fixed batches."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss = model(x.to(device), y.to(device))
        total += float(loss)
    model.train(was_training)
    return total / max(1, len(batches))
