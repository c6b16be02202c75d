"""Failures of a round that carry who caused them (shared by the all-reduce and the all-gather)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from hivemind.averaging.allreduce import AllreduceException

logger = logging.getLogger(__name__)


class PartialAllReduce(AllreduceException):
    """Some parts of the vector were not averaged (a reducer failed). ``suspects``: the failed reducers."""

    def __init__(self, message: str, suspects: Sequence[str] = ()):
        super().__init__(message, tuple(suspects))  # both in args, so they survive pickling across processes
        self.suspects = tuple(suspects)

    def __str__(self) -> str:
        return str(self.args[0])


class RoundFailures:
    """Which group mates failed this peer in a round, and how.

    A broken stream means the peer is gone: a *suspect*, which a re-run leaves out. A timeout may be a
    live peer slowed by another's failure (its reducer waits for the dead peer's parts): named, not
    suspected.
    """

    def __init__(self, role: str):
        self.role = role
        self.gone: list[str] = []
        self.slow: list[str] = []

    def record(self, peer_b58: str, error: BaseException) -> None:
        slow = isinstance(error, (asyncio.TimeoutError, asyncio.CancelledError))
        (self.slow if slow else self.gone).append(peer_b58)
        logger.warning("%s %s failed: %s", self.role, peer_b58[-8:], repr(error)[:200])

    def error(self, what: str) -> PartialAllReduce:
        """The round's failure, ``what`` saying how much of it was missing."""
        suspects = sorted(set(self.gone))
        slow = sorted(set(self.slow) - set(suspects))
        named = [f"{self.role}(s) {', '.join(p[-8:] for p in suspects)} failed"] if suspects else []
        named += [f"{self.role}(s) {', '.join(p[-8:] for p in slow)} timed out"] if slow else []
        return PartialAllReduce(f"{what}: {'; '.join(named) or f'a {self.role} failed'}", suspects)


__all__ = ["PartialAllReduce", "RoundFailures"]
