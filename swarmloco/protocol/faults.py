"""Injected faults for tests and benchmarks (off unless ``SWARMLOCO_FAULT`` is set).

``SWARMLOCO_FAULT=hang_allreduce:N`` makes this peer's N-th all-reduce (1-based, counted in the
averager process) hang as a reducer: it takes the others' parts and never sends the average back
(with a sparse codec: it joins the all-gather and never sends its payload). It prints one
``@@swarmloco {"type": "event", "kind": "fault", ...}`` line on stdout and hang there. A test that
reads that line knows the peer is in the middle of an all-reduce and kills it at that exact moment,
with no sleeps. ``SWARMLOCO_FAULT=stall_allreduce:1`` hangs in every all-reduce: a staller, a peer that joins
groups and never answers.

``SWARMLOCO_FAULT=hang_at_barrier:N`` makes the peer stop dead right after its N-th ready barrier found the
round's group (before its matchmaking: its mates are about to ask it to lead), with the same announcement:
a test that reads it kills the whole peer there, a crash at the moment its mates count on it.

``SWARMLOCO_FAULT=slow_steps:SECONDS`` adds SECONDS to each inner step: a slow peer, for the
heterogeneous-speed tests.

A hostile peer, for the robustness tests: ``poison_scale:K`` multiplies the pseudo-gradient it sends by
K, ``poison_random:S`` sends Gaussian noise of standard deviation S instead, ``poison_nan:1`` sends NaN,
``poison_weight:K`` claims K times the samples it processed, ``poison_bytes:1`` sends undecodable bytes
(every encoded part or payload inverted after encoding: what a peer not running our code can send).

``SWARMLOCO_FAULT=no_dht:1`` makes starting a DHT node fail with a message saying so: the CLI input
tests use it to prove that a bad input is refused before any DHT node (and p2pd) starts.
Nothing else reads the variable; unset or malformed means no fault.
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
