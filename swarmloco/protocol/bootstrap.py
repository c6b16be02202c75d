"""Joining through initial peers that do not answer yet: retry with backoff for a bounded time.

p2pd refuses to start when none of its bootstrap peers (``swarm.initial_peers``) answers: a bootstrap peer
that is still starting, restarting, or busy with a crowd of newcomers at once turns each of them away. A
start then waits and tries again, with exponential backoff and jitter (so that newcomers refused together
do not come back together), for up to ``swarm.bootstrap_timeout`` seconds, each wait said in one log line;
after that the last error goes to the caller (exit 1). Any other start error is not retried.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY = 1.0
MAX_DELAY = 15.0
NO_ANSWER = ("failed to connect to bootstrap peers", "none of the initial_peers responded")
"""p2pd's words when none of its bootstrap peers could be dialled, and hivemind's when none answered a ping."""


def no_initial_peer_answered(error: BaseException) -> bool:
    """Whether a start failed only because none of the initial peers answered."""
    text = " ".join(str(error).split()).lower()
    return any(words in text for words in NO_ANSWER)


def retry_delay(attempt: int, rng: random.Random) -> float:
    """Seconds before try ``attempt + 1``: 1, 2, 4, 8, 15, 15... each between half and all of it."""
    base = min(MAX_DELAY, FIRST_DELAY * 2 ** attempt)
    return base * (0.5 + 0.5 * rng.random())


class Stopped(RuntimeError):
    """The stop event was set while a start waited for the initial peers."""


def start_with_retries(start: Callable[[], T], *, initial_peers: Sequence[str], timeout: float,
                       stop: threading.Event | None = None, rng: random.Random | None = None,
                       clock: Callable[[], float] = time.monotonic) -> T:
    """``start()``, tried again while it fails because no initial peer answered, for up to ``timeout`` seconds
    (0: once). Raises the last error when the time is up, :class:`Stopped` when ``stop`` is set meanwhile."""
    rng = rng or random.Random()
    deadline = clock() + timeout
    waiting = stop or threading.Event()
    attempt = 0
    while True:
        try:
            return start()
        except Exception as e:
            delay = retry_delay(attempt, rng)
            left = deadline - clock()
            if not initial_peers or not no_initial_peer_answered(e) or left < delay:
                raise
            logger.warning("none of the %d initial peer(s) answered; trying again in %.0f s (giving up in %.0f s)",
                           len(initial_peers), delay, left)
            if waiting.wait(delay):
                raise Stopped("stopped while waiting for the initial peers") from None
        attempt += 1


__all__ = ["NO_ANSWER", "Stopped", "no_initial_peer_answered", "retry_delay", "start_with_retries"]
