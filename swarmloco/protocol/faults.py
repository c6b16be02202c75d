"""Injected faults for tests and benchmarks, chosen by ``SWARMLOCO_FAULT=KIND:ARG`` (unset or malformed: none).

* ``hang_allreduce:N``: this peer's N-th all-reduce (1-based, counted in the averager process) hangs as a
  reducer: it takes the others' parts and never sends the average (sparse codec: it joins the all-gather and
  never sends its payload). ``stall_allreduce:1`` does so in every all-reduce: a peer that never answers.
* ``hang_at_barrier:N``: the peer stops dead right after its N-th ready barrier found the round's group, just
  before its mates ask it to lead.
* ``slow_steps:SECONDS``: each inner step takes SECONDS longer (heterogeneous-speed tests).
* A hostile peer: ``poison_scale:K`` scales the pseudo-gradient it sends by K, ``poison_random:S`` sends
  Gaussian noise of standard deviation S, ``poison_nan:1`` sends NaN, ``poison_weight:K`` claims K times its
  samples, ``poison_bytes:1`` inverts every encoded part or payload (what a peer not running our code sends).
* ``no_dht:1``: starting a DHT node raises, so the CLI tests prove bad input is refused before p2pd starts.

A hang prints one ``@@swarmloco {"type": "event", "kind": "fault", ...}`` line on stdout first: a test that
reads it kills the peer at that exact moment, with no sleeps.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

ENV = "SWARMLOCO_FAULT"
_allreduce_count = 0


def next_allreduce_hangs() -> bool:
    """Count one all-reduce; True if this is the one ``hang_allreduce:N`` names (or any, ``stall_allreduce``)."""
    global _allreduce_count
    _allreduce_count += 1
    kind, _, arg = os.environ.get(ENV, "").partition(":")
    return (kind == "hang_allreduce" and arg.isdigit() and int(arg) == _allreduce_count) or kind == "stall_allreduce"


_barrier_count = 0


def maybe_hang_at_barrier() -> None:
    """``hang_at_barrier:N``: at the N-th barrier that found a group, announce it and block forever."""
    global _barrier_count
    kind, _, arg = os.environ.get(ENV, "").partition(":")
    if kind != "hang_at_barrier":
        return
    _barrier_count += 1
    if arg.isdigit() and int(arg) == _barrier_count:
        announce(f"hanging after barrier {_barrier_count}")
        while True:
            time.sleep(3600)


def stalling() -> bool:
    """``stall_allreduce``: this peer joins every group and never answers."""
    return os.environ.get(ENV, "").partition(":")[0] == "stall_allreduce"


def inner_step_delay() -> float:
    kind, _, arg = os.environ.get(ENV, "").partition(":")
    try:
        return max(0.0, float(arg)) if kind == "slow_steps" else 0.0
    except ValueError:
        return 0.0


def refuse_dht() -> None:
    """``no_dht``: a DHT node must not start in this process (tests of input checks)."""
    if os.environ.get(ENV, "").partition(":")[0] == "no_dht":
        raise RuntimeError("SWARMLOCO_FAULT=no_dht: a DHT node was about to start")


def announce(message: str) -> None:
    sys.stdout.write("@@swarmloco " + json.dumps({"type": "event", "kind": "fault", "message": message,
                                                  "time": time.time()}) + "\n")
    sys.stdout.flush()


def _arg(kind: str) -> float | None:
    name, _, arg = os.environ.get(ENV, "").partition(":")
    if name != kind:
        return None
    try:
        return float(arg)
    except ValueError:
        return None


def poison(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """What a hostile peer sends instead of its pseudo-gradient (unchanged without a poison fault)."""
    scale, noise = _arg("poison_scale"), _arg("poison_random")
    if _arg("poison_nan") is not None:
        return [torch.full_like(t, float("nan")) for t in tensors]
    if scale is not None:
        return [t * scale for t in tensors]
    if noise is not None:
        return [torch.randn_like(t) * noise for t in tensors]
    return tensors


def poison_weight(samples: int) -> int:
    factor = _arg("poison_weight")
    return int(samples * factor) if factor is not None else samples


def corrupt(payload: bytes) -> bytes:
    """What a hostile peer sends instead of an encoded part (unchanged without ``poison_bytes``)."""
    return bytes(b ^ 0xFF for b in payload) if _arg("poison_bytes") is not None else payload
