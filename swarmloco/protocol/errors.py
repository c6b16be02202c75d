"""Failures of a round that carry who caused them (shared by the all-reduce and the all-gather)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from hivemind.averaging.allreduce import AllreduceException

from swarmloco.compression.base import CodecError

logger = logging.getLogger(__name__)


class PartialAllReduce(AllreduceException):
    """Some parts of the vector were not averaged (a reducer failed). ``suspects``: the failed reducers;
    ``rejected``: peers that sent something invalid (also suspects); ``slow``: peers that timed out."""

    def __init__(self, message: str, suspects: Sequence[str] = (), rejected: Sequence[str] = (),
                 slow: Sequence[str] = ()):
        # all in args, so they survive pickling across processes
        super().__init__(message, tuple(suspects), tuple(rejected), tuple(slow))
        self.suspects = tuple(suspects)
        self.rejected = tuple(rejected)
        self.slow = tuple(slow)

    def __str__(self) -> str:
        return str(self.args[0])


class PeerAnswered(AllreduceException):
    """A group mate answered with an error code instead of its data: it is alive (most often its own part of
    the round failed because of another member), so a re-run waits for it like any live peer."""


class InvalidContribution(AllreduceException):
    """A peer sent something no honest peer sends (bad weight, wrong size, more parts than expected)."""


class RoundFailures:
    """Which group mates failed this peer in a round, and how.

    A broken stream means the peer is gone: a *suspect*, which a re-run leaves out. A timeout may be a
    live peer slowed by another's failure (its reducer waits for the dead peer's parts): named, not
    suspected. A peer that answered with an error code is alive: named only. A peer that sent an invalid
    part or payload (NaN/Inf, undecodable, wrong size or weight) is *rejected*: a suspect, and the node
    excludes it from the next rounds (``swarm.exclude_rounds``).
    """

    def __init__(self, role: str):
        self.role = role
        self.gone: list[str] = []
        self.slow: list[str] = []
        self.rejected: list[str] = []
        self.answered: list[str] = []

    def record(self, peer_b58: str, error: BaseException) -> None:
        if is_invalid(error):
            self.reject(peer_b58, error, self.role)
            return
        if isinstance(error, PeerAnswered):
            self.answered.append(peer_b58)
        else:
            slow = isinstance(error, (asyncio.TimeoutError, asyncio.CancelledError))
            (self.slow if slow else self.gone).append(peer_b58)
        logger.warning("%s %s failed: %s", self.role, peer_b58[-8:], repr(error)[:200])

    def reject(self, peer_b58: str, error: BaseException, role: str = "sender") -> None:
        """``peer_b58`` (as a ``role``) sent something invalid."""
        if peer_b58 not in self.rejected:
            self.rejected.append(peer_b58)
            logger.warning("rejected what peer %s sent as a %s: %s", peer_b58[-8:], role, str(error)[:200])

    def error(self, what: str) -> PartialAllReduce:
        """The round's failure, ``what`` saying how much of it was missing."""
        rejected = sorted(set(self.rejected))
        if rejected:
            what += f"; invalid data from {', '.join(p[-8:] for p in rejected)}"
        suspects = sorted(set(self.gone) | set(rejected))
        slow = sorted(set(self.slow) - set(suspects))
        named = [f"{self.role}(s) {', '.join(p[-8:] for p in suspects)} failed"] if suspects else []
        named += [f"{self.role}(s) {', '.join(p[-8:] for p in slow)} timed out"] if slow else []
        answered = sorted(set(self.answered) - set(suspects) - set(slow))
        named += [f"{self.role}(s) {', '.join(p[-8:] for p in answered)} answered an error"] if answered else []
        return PartialAllReduce(f"{what}: {'; '.join(named) or f'a {self.role} failed'}", suspects, rejected, slow)


def is_invalid(error: BaseException) -> bool:
    """Whether ``error`` says the peer sent invalid data (rather than failed or was slow)."""
    return isinstance(error, (CodecError, InvalidContribution))


__all__ = ["InvalidContribution", "PartialAllReduce", "PeerAnswered", "RoundFailures", "is_invalid"]
