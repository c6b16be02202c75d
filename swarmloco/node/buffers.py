"""The fp32 CPU tensors a round works on, beside the user's model on its device.

``global_params`` is the last agreed model, identical bit for bit on every peer of the same rounds (the outer
optimizer steps on it); ``staging`` holds the local parameters copied off the device, ``pseudo`` the
pseudo-gradient ``global - local`` and ``averaged`` the group's average. On CUDA the CPU side of every
host<->device copy is pinned, so the copies run asynchronously until :meth:`RoundBuffers.sync_device`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch


def _cpu_buffer(like: torch.Tensor, pin: bool) -> torch.Tensor:
    """An fp32 CPU tensor shaped like ``like`` (page-locked when ``pin``)."""
    return torch.empty(like.shape, dtype=torch.float32, pin_memory=pin)


class RoundBuffers:
    """The global parameters and a round's working copies of ``model``'s parameters."""

    def __init__(self, model: torch.nn.Module):
        params = list(model.parameters())
        if not params:
            raise ValueError("the model has no parameters to train")
        self.model = model
        self.device = params[0].device
        pin = self.device.type == "cuda"
        self.global_params = [_cpu_buffer(p, pin).copy_(p.detach()) for p in params]
        self.staging = [_cpu_buffer(p, pin) for p in params]
        self.pseudo = [torch.zeros_like(p) for p in self.global_params]
        self.averaged = [torch.zeros_like(p) for p in self.global_params]

    @property
    def fp32_bytes(self) -> int:
        return 4 * sum(p.numel() for p in self.global_params)

    def sync_device(self) -> None:
        """Wait for the asynchronous copies between pinned CPU buffers and the device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def pseudo_gradient(self, index: Sequence[int]) -> list[torch.Tensor]:
        """``global - local`` of the parameters ``index`` into ``pseudo`` (one device sync for all tensors);
        ``staging`` keeps the local parameters."""
        params = list(self.model.parameters())
        for i in index:
            self.staging[i].copy_(params[i].detach(), non_blocking=True)
        self.sync_device()
        for i in index:
            torch.sub(self.global_params[i], self.staging[i], out=self.pseudo[i])
        return [self.pseudo[i] for i in index]

    @torch.no_grad()
    def copy_global_into_model(self, index: Iterable[int] | None = None,
                               rest: Callable[[int], torch.Tensor | None] | None = None) -> None:
        """The model's parameters (those of ``index``, default all) := the global parameters, minus ``rest(i)``
        where the codec keeps a round's unsent rest in the model (``rotate``, ``hadtopk``)."""
        params = list(self.model.parameters())
        for i in range(len(params)) if index is None else index:
            kept = rest(i) if rest is not None else None
            if kept is None:
                params[i].copy_(self.global_params[i], non_blocking=True)  # from pinned memory on CUDA: async
            else:  # (the simulator's landing: the same fp32 operation)
                params[i].copy_(self.global_params[i] - kept)
        self.sync_device()  # the outer step may rewrite the source buffers next

    @contextlib.contextmanager
    def global_in_model(self) -> Iterator[None]:
        """The global parameters in the model for the block (an evaluation), this peer's own restored after."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.model.parameters()]
            self.copy_global_into_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.model.parameters(), saved):
                    p.copy_(s)


__all__ = ["RoundBuffers"]
