"""What a peer prints to the console: one line per outer step, and one line when its work was lost.

``swarmloco run`` / ``join`` subscribe a :class:`ConsoleReporter` to the status board's round records
(the same records ``--json-events`` prints and the demo folds into its lines), so an operator sees
the run move without reading logs::

    outer  12 | train 2.3317 | eval 2.4853 | peers 3 | sent 2.6 MB recv 2.6 MB | round 6.8s (compute 5.9, wait 0.4, averaging 0.4, other 0.1)
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from typing import Any

from swarmloco.display import fmt_bytes, round_parts
from swarmloco.protocol.clock import explain_refusal


def say(line: str, stream=None) -> None:
    """Print one line; a closed terminal (SIGHUP) or pipe must not turn into an exception."""
    try:
        print(line, file=stream or sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def one_line(e: BaseException) -> str:
    """An exception as one short line (hivemind's errors can carry p2pd's whole output; its refusal of a clock
    off the swarm's says what to do)."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = explain_refusal(text) or text
    return text[:300] + "..." if len(text) > 300 else text


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "  -   "


def format_round_line(summary: dict[str, Any], last_round: dict[str, Any] | None = None) -> str:
    """One outer step of this peer, from its round record (and the board's ``last_round`` for the parts)."""
    step = summary.get("outer_step")
    head = f"outer {step:3d}" if isinstance(step, int) else "outer   ?"
    if summary.get("adopted"):
        if not summary.get("ok"):
            return f"{head} | did not adopt the swarm's state ({summary.get('error')})"
        return f"{head} | adopted the swarm's state | eval {_loss(summary.get('eval_loss'))}"
    round_time = summary.get("round_time")
    parts = round_parts(last_round if (last_round or {}).get("outer_step") == step else None, round_time)
    split = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
    if (last_round or {}).get("overlapped") and (last_round or {}).get("outer_step") == step:
        hidden = sum(float(last_round.get(k) or 0.0) for k in ("barrier_s", "matchmaking_s", "allreduce_s"))
        split += f"; {hidden:.1f} of barrier and averaging behind training"
    line = (f"{head} | train {_loss(summary.get('train_loss'))} | eval {_loss(summary.get('eval_loss'))} | "
            f"peers {summary.get('peers') or 1} | sent {fmt_bytes(float(summary.get('bytes_sent') or 0))} "
            f"recv {fmt_bytes(float(summary.get('bytes_received') or 0))} | "
            f"round {float(round_time or 0.0):.1f}s ({split})")
    if summary.get("ok"):
        return line
    return f"{head} | round failed ({summary.get('error')}): this peer's inner work carries into its next round"


def lost_work_warning(summary: dict[str, Any], inner_steps: int, run_inner_steps: int) -> str | None:
    """One line when this peer's inner work of a round was dropped, and why; else None (a failed round
    says so in its own line: its work is not lost, it carries into the next round)."""
    step, done = summary.get("outer_step"), int(summary.get("inner_steps") or 0)
    if summary.get("adopted") and summary.get("ok") and done > 0:
        if inner_steps > run_inner_steps:
            why = (f"its --inner-steps {inner_steps} is larger than the run's inner.steps = {run_inner_steps}, so the "
                   f"others finish first every round; use --inner-steps {run_inner_steps} or less")
        else:
            why = "the swarm finished the round first (a slower machine, or a late join or restart)"
        return f"swarmloco: warning: outer step {step}: this peer's {done} inner steps were dropped: {why}"
    return None


class ConsoleReporter:
    """Prints :func:`format_round_line` per round and :func:`lost_work_warning` when it applies.

    ``write``: where lines go (stderr by default; the log file under ``--tui``). ``last_round``: the
    board's latest round details. ``quiet``: once set (a stop was asked for), nothing more is printed."""

    def __init__(self, write: Callable[[str], None] = say, *, last_round: Callable[[], Any] = lambda: None,
                 inner_steps: int = 0, run_inner_steps: int = 0, quiet: threading.Event | None = None):
        self.write, self.last_round = write, last_round
        self.inner_steps, self.run_inner_steps = inner_steps, run_inner_steps
        self.quiet = quiet or threading.Event()

    def round_done(self, summary: dict[str, Any]) -> None:
        if self.quiet.is_set():
            return
        self.write(format_round_line(summary, self.last_round()))
        warning = lost_work_warning(summary, self.inner_steps, self.run_inner_steps)
        if warning:
            self.write(warning)

    def event(self, kind: str, message: str) -> None:
        pass  # events that matter to an operator are logged as warnings where they happen


__all__ = ["ConsoleReporter", "format_round_line", "lost_work_warning", "one_line", "say"]
