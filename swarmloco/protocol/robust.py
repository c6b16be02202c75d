"""Contributions are checked before they are averaged: a peer sending garbage moves nobody far.

Every reducer (butterfly all-reduce) and every member (sparse all-gather) combines the contributions it
holds with :func:`robust_combine` instead of a plain weighted mean:

* a contribution whose L2 norm exceeds ``clip_factor`` x the **lower median** of the non-zero norms is
  scaled down to that bound (a x1000 or random-noise update counts as at most ``clip_factor`` honest ones);
* a claimed weight (samples) above ``clip_factor`` x the lower median weight is capped the same way;
* non-finite values never get here: decoders reject NaN/Inf (``CodecError``).

The references count only contributors that did work this round (a joiner sends zeros), and only when there
are at least ``MIN_CONTRIBUTORS``: with two, nothing tells the honest one apart. The lower median keeps one
attacker among three or four from raising the bound. The sum runs in sender order, so the result is the same
bits wherever it is computed. With ``clip_factor`` 0 the combination is the plain weighted mean.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import torch
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer

logger = logging.getLogger(__name__)


def lower_median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def robust_combine(parts: Sequence[torch.Tensor], weights: Sequence[float], clip_factor: float,
                   sparse: bool = False) -> tuple[torch.Tensor, list[int], list[int]]:
    """Weighted mean of ``parts`` after clipping norms and weights.

    ``sparse`` (top-k payloads, which hold each sender's own coordinates): each coordinate is the weighted
    mean over the parts that sent it (a non-zero value), as SparseLoCo's reference aggregates
    (``scatter_reduce(mean)``); a coordinate nobody sent stays 0. Dense: over all parts.

    Returns (mean, indices whose norm was clipped, indices whose weight was capped): a clipped norm is a
    strike against the sender (see ``swarm.exclude_rounds``); a capped weight is not (a fast GPU among
    CPUs honestly claims many more samples), the cap alone bounds it."""
    weights = [float(w) for w in weights]
    clipped: set[int] = set()
    capped: set[int] = set()
    scales = [1.0] * len(parts)
    if clip_factor > 0:
        norms = [float(torch.linalg.vector_norm(p.float())) for p in parts]
        # peers that did no work this round (a joiner, a peer that just caught up) send zeros with a
        # token weight: they neither set the references nor get clipped
        working = [i for i in range(len(parts)) if norms[i] > 0 and weights[i] >= MIN_WORK_WEIGHT]
        if len(working) >= MIN_CONTRIBUTORS:
            bound = clip_factor * lower_median([norms[i] for i in working])
            cap = clip_factor * lower_median([weights[i] for i in working])
            for i in working:
                if norms[i] > bound:
                    scales[i] = bound / norms[i]
                    clipped.add(i)
                if weights[i] > cap:
                    weights[i] = cap
                    capped.add(i)
    total = sum(weights)
    if not total > 0:
        raise AllreduceException("contributions' weights sum to zero")
    acc = torch.zeros_like(parts[0], dtype=torch.float32)
    for part, weight, scale in zip(parts, weights, scales):
        acc.add_(part.float(), alpha=weight * scale)
    if sparse:
        return sender_mean(acc, parts, weights), sorted(clipped), sorted(capped)
    return acc.div_(total), sorted(clipped), sorted(capped)


def sender_mean(acc: torch.Tensor, parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``acc`` (the weighted sum of ``parts``) divided, coordinate by coordinate, by the summed weights of
    the parts that are non-zero there; 0 where none is. The simulator calls it too (the same bits)."""
    senders = torch.zeros_like(acc)
    for part, weight in zip(parts, weights):
        senders.add_((part != 0).to(torch.float32), alpha=weight)
    return torch.where(senders > 0, acc / senders.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


MIN_CONTRIBUTORS = 3
"""With fewer working contributors nothing tells the honest one apart: the plain weighted mean."""
MIN_WORK_WEIGHT = 1.0
"""A weight (samples) below this is a peer taking part without having trained since the last round."""


class RobustPartReducer(TensorPartReducer):
    """hivemind's TensorPartReducer, holding a part's contributions until all have come, then combining
    them with :func:`robust_combine` (hivemind adds each one to a running sum as it arrives)."""

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, clip_factor: float):
        self.clip_factor = clip_factor
        self._pending: dict[int, tuple[torch.Tensor, float]] = {}
        self.clipped_parts = [0] * num_senders
        """Per sender: how many of its parts had their norm clipped (its peer is named in the log)."""
        self.capped_parts = [0] * num_senders
        """Per sender: how many of its parts had their claimed weight capped."""
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        self._pending = {}
        super().reset_accumulators()

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        assert 0 <= sender_index < self.num_senders and 0 <= part_index < self.num_parts
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:  # wait for the previous parts to be combined
            finished = asyncio.ensure_future(self.finished.wait())
            try:
                await asyncio.wait({self.current_part_future, finished}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                finished.cancel()
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {type(self).__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._pending[sender_index] = (tensor_part, weight)
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await future

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            senders = sorted(self._pending)
            if senders:
                mean, clipped, capped = robust_combine([self._pending[i][0] for i in senders],
                                                       [self._pending[i][1] for i in senders], self.clip_factor)
                for k in clipped:
                    self.clipped_parts[senders[k]] += 1
                for k in capped:
                    self.capped_parts[senders[k]] += 1
            else:
                mean = torch.zeros(self.part_shapes[self.current_part_index])
            self.current_part_future.set_result(mean)
            self.reset_accumulators()


def name_clipped(peer_ids, clipped_parts, capped_parts) -> tuple[list[str], list[str]]:
    """Name every peer whose contribution this peer had to clip or cap (one line each); returns the ids of
    those whose update norm was clipped (a strike) and of those whose claimed weight was capped (no strike:
    a fast GPU among CPUs honestly claims many more samples; the cap alone bounds it)."""
    clipped, capped = [], []
    for peer, n_clipped, n_capped in zip(peer_ids, clipped_parts, capped_parts):
        name = peer.to_base58()
        if n_clipped:
            clipped.append(name)
            logger.warning("clipped the update of peer %s in %d part(s): its norm was far above the group's "
                           "median", name[-8:], n_clipped)
        if n_capped:
            capped.append(name)
            logger.warning("capped the claimed samples of peer %s in %d part(s) at the group's bound",
                           name[-8:], n_capped)
    return clipped, capped


__all__ = ["RobustPartReducer", "lower_median", "name_clipped", "robust_combine"]
