"""How every swarmloco command stops: SIGINT, SIGTERM or SIGHUP, to the process or its whole group.

The first signal prints one line and sets a stop flag; the command then finishes in order (a peer
abandons its inner steps, leaves a round in flight after a short grace, marks itself stopped in the
DHT, writes its checkpoint and shuts hivemind's processes down) and exits 0. hivemind's processes are
outside the signalled process group (:mod:`swarmloco.protocol.processes`), so they are still there to
be stopped in order. A second signal kills them and exits at once (130); a stop not done after
:data:`STOP_DEADLINE` seconds (a network call hung) is cut short the same way (exit 1).

After the first signal the console stays quiet: :class:`QuietAfterStop` drops records below ERROR (and
all of hivemind's) unless ``-v`` is given, here and in hivemind's helpers, which log through a copy of
the same handler and learn of the stop through a process-shared flag. :class:`OneLineFormatter` keeps
tracebacks off the console.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading

from swarmloco.app.console import say
from swarmloco.protocol.processes import reap_helpers

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_DEADLINE = 60.0
"""Seconds after the first signal by which a command has exited (the clean path takes a few)."""

PEER_STOP = "stopping cleanly (leaving the swarm, writing the checkpoint; a second signal exits at once)"
NODE_STOP = "stopping (leaving the swarm; a second signal exits at once)"


_quiet = None  # a multiprocessing.Event: set on the first signal, seen by hivemind's helper processes too


def quiet_flag():
    """The process-shared "a stop was asked for" flag (create it before hivemind forks its helpers)."""
    global _quiet
    if _quiet is None:
        _quiet = multiprocessing.get_context("fork").Event()
    return _quiet


def install_stop_handlers(stop: threading.Event, doing: str = PEER_STOP, deadline: float = STOP_DEADLINE) -> None:
    """Route SIGINT, SIGTERM and SIGHUP (the terminal or SSH session closed) to ``stop``."""
    quiet = quiet_flag()

    def handler(signum, frame):
        if quiet.is_set():  # (a stop of another cause, e.g. the run's last step, is no first signal)
            say("swarmloco: second signal, exiting now")
            _exit_now(130)
        say(f"swarmloco: {signal.Signals(signum).name} received, {doing}")
        quiet.set()
        stop.set()
        threading.Thread(target=_watchdog, args=(deadline,), name="stop-watchdog", daemon=True).start()

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def _watchdog(deadline: float) -> None:
    threading.Event().wait(deadline)
    say(f"swarmloco: did not stop within {deadline:.0f}s; killing its processes")
    _exit_now(1)


def _exit_now(code: int) -> None:
    reap_helpers()  # hivemind's helpers and p2pd: not left behind
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


class QuietAfterStop(logging.Filter):
    """A handler filter: once ``stop`` is set, only errors of our own get through (a clean stop prints one
    line; hivemind's shutdown chatter and the warnings of a round left on purpose are noise then)."""

    def __init__(self, stop: threading.Event):
        super().__init__()
        self.stop, self.quiet = stop, quiet_flag()

    def filter(self, record: logging.LogRecord) -> bool:
        if not (self.stop.is_set() or self.quiet.is_set()):
            return True
        return record.levelno >= logging.ERROR and not record.name.startswith("hivemind")


class OneLineFormatter(logging.Formatter):
    """Each record on one line: an exception is named after the message, its traceback left out (``-v``
    keeps the plain formatter, tracebacks included). hivemind logs a traceback for every failed round."""

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            text = super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        if exc is not None and str(exc) not in text:
            text += f" ({type(exc).__name__}: {exc})"
        return " ".join(text.split("\n"))


__all__ = ["NODE_STOP", "OneLineFormatter", "PEER_STOP", "QuietAfterStop", "STOP_DEADLINE", "STOP_SIGNALS",
           "install_stop_handlers", "quiet_flag"]
