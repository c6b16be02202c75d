"""Is this machine's clock in step with the swarm's? Read from the times the peers put in their heartbeats.

Heartbeats, records and DHT entries are dated by their senders' clocks (hivemind's ``get_dht_time`` is the
wall clock; it allows nodes ``MAX_DHT_TIME_DISCREPANCY_SECONDS`` = 3 s apart). A volunteer's machine whose
clock is off by more fails in ways nothing else explains: behind, its heartbeats reach the others already
old (the swarm drops it from rounds, or, more than ``heartbeat_ttl`` behind, never sees it at all); ahead,
its heartbeats look fresh after it died (the swarm keeps waiting for it), and the others' look old to it.

A heartbeat read for the first time (its ``time`` moved since the last read) was sent at most a heartbeat
period and a DHT read ago, so ``sent - now`` is this peer's offset from its sender minus that age. The
largest of a sender's last few readings is close to the offset itself; the median over the senders is the
swarm's verdict on this clock (one peer with a wrong clock cannot make the others look wrong). Behind by
``d`` reads as ``+d`` (the others' heartbeats come from its future), ahead as ``-d``.
"""

from __future__ import annotations

import re
import statistics
import threading
from collections import deque

TOLERANCE_S = 3.0
"""Clocks further apart than this break hivemind's assumption (``MAX_DHT_TIME_DISCREPANCY_SECONDS``)."""
READINGS = 8
"""Readings kept per sender (the largest counts: the one read soonest after it was sent)."""
MAX_SENDERS = 256
ADVICE = "sync it, e.g. `timedatectl set-ntp true`"
_REFUSAL = re.compile(r"local time must be within ([\d.]+) seconds\s+of others\s*\(local: ([\d.]+), peer: ([\d.]+)\)")


def explain_refusal(text: str) -> str | None:
    """hivemind's DHT refuses to start when a peer it dials answers a time more than 3 s off this machine's
    (``local time must be within 3 seconds of others(local: ..., peer: ...)``): the same in words, with what
    to do; None for any other text."""
    found = _REFUSAL.search(text)
    if found is None:
        return None
    allowed, local, peer = (float(g) for g in found.groups())
    side = "behind" if peer > local else "ahead of"
    return (f"this machine's clock is about {abs(peer - local):.0f} s {side} the clock of the peer it dialled, and "
            f"hivemind refuses clocks more than {allowed:.0f} s apart; {ADVICE}")


class ClockCheck:
    """The offset of this machine's clock from the swarm's peers' (``slack``: the longest a heartbeat can
    wait in the DHT before it is read, a heartbeat period: readings that far below zero are only age)."""

    def __init__(self, slack: float = 2.0, tolerance: float = TOLERANCE_S):
        self.slack, self.tolerance = slack, tolerance
        self._readings: dict[str, deque[float]] = {}
        self._lock = threading.Lock()  # (the barrier and the heartbeat thread both read heartbeats)

    def observe(self, sender: str, sent: float, now: float) -> None:
        """A heartbeat of ``sender`` dated ``sent`` (its clock) read for the first time at ``now`` (ours)."""
        with self._lock:
            readings = self._readings.get(sender)
            if readings is None:
                if len(self._readings) >= MAX_SENDERS:
                    return
                readings = self._readings[sender] = deque(maxlen=READINGS)
            readings.append(sent - now)

    def forget(self, sender: str) -> None:
        with self._lock:
            self._readings.pop(sender, None)

    def offset(self) -> tuple[float, int] | None:
        """(seconds this clock is behind the senders' median: negative when ahead, number of senders), or None
        before any reading."""
        with self._lock:
            best = [max(r) for r in self._readings.values()]
        return (statistics.median(best), len(best)) if best else None

    def problem(self) -> str | None:
        """One line saying how far off this clock is, when it is further than the swarm tolerates."""
        found = self.offset()
        if found is None:
            return None
        offset, senders = found
        if -(self.tolerance + self.slack) <= offset <= self.tolerance:
            return None
        side = "behind" if offset > 0 else "ahead of"
        whose = (f"the median of {senders} peers' clocks" if senders > 1
                 else "the one other peer's clock (or that one is off)")
        return (f"this machine's clock is about {abs(offset):.0f} s {side} {whose}, by their heartbeats; the swarm "
                f"tolerates {self.tolerance:.0f} s (heartbeats are dated by their senders: the others may drop this "
                f"peer or wait for dead ones); {ADVICE}")
