"""Failures of a round that carry who caused them (shared by the all-reduce and the all-gather)."""

from __future__ import annotations

from collections.abc import Sequence

from hivemind.averaging.allreduce import AllreduceException


class PartialAllReduce(AllreduceException):
    """Some parts of the vector were not averaged (a reducer failed). ``suspects``: the failed reducers."""

    def __init__(self, message: str, suspects: Sequence[str] = ()):
        super().__init__(message, tuple(suspects))  # both in args, so they survive pickling across processes
        self.suspects = tuple(suspects)

    def __str__(self) -> str:
        return str(self.args[0])


__all__ = ["PartialAllReduce"]
