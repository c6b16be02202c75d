"""Plain-text units and names shared by the console, the demo and the monitor.

Bytes are in SI units (1 kB = 1000 B), peer ids are shortened to their last 8 characters, and the *round
time* is the wall time of a round, from the start of its inner steps to the end of its outer step and
held-out eval (the next round starts right after, once a checkpoint due then is written), split into
compute (inner steps), wait (the ready barrier), averaging (matchmaking and all-reduce) and other (outer
step, eval, re-runs). With rounds overlapped (``outer.overlap``) the round time is the time between two
rounds landing, *wait* is what the round cost the training loop (starting it, waiting for it to land,
applying it), and the barrier and averaging time that ran behind training is named after the parts.
"""

from __future__ import annotations

import math
from typing import Any

PEER_ID_CHARS = 8


def fmt_bytes(n: float) -> str:
    """Bytes in SI units: '512 B', '2.6 MB' (one unit system in every line and screen)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # not reached


def round_parts(last_round: dict[str, Any] | None, round_time: float | None) -> dict[str, float]:
    """The parts of a round's time (see the module docstring); 'other' is what the named parts leave."""
    last = last_round or {}

    def part(key: str) -> float:
        v = last.get(key)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else 0.0

    if last.get("overlapped"):  # the barrier and the averaging ran behind the inner steps: wait = what they cost them
        parts = {"compute": part("compute_s"), "wait": part("blocked_s"), "averaging": 0.0}
    else:
        parts = {"compute": part("compute_s"), "wait": part("barrier_s"),
                 "averaging": part("matchmaking_s") + part("allreduce_s")}
    if isinstance(round_time, (int, float)) and math.isfinite(round_time):
        parts["other"] = max(0.0, float(round_time) - sum(parts.values()))
    return parts
