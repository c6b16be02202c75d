"""What ``run`` / ``join`` print: one line per outer step, and one line when this peer's work was dropped."""

from __future__ import annotations

import threading

import pytest

from swarmloco.app.console import ConsoleReporter, format_round_line, lost_work_warning

AVERAGED = {"outer_step": 7, "ok": True, "adopted": False, "train_loss": 2.31, "eval_loss": 2.45, "peers": 3,
            "bytes_sent": 2_600_000, "bytes_received": 2_700_000, "round_time": 6.8, "inner_steps": 50}
LAST = {"outer_step": 7, "compute_s": 5.9, "barrier_s": 0.4, "matchmaking_s": 0.3, "allreduce_s": 0.1}
ADOPTED = {"outer_step": 9, "ok": True, "adopted": True, "eval_loss": 2.2, "inner_steps": 31, "peers": 1}


def test_a_round_is_one_line_with_losses_peers_bytes_and_the_parts_of_its_time() -> None:
    line = format_round_line(AVERAGED, LAST)
    assert line == ("outer   7 | train 2.3100 | eval 2.4500 | peers 3 | sent 2.6 MB recv 2.7 MB | "
                    "round 6.8s (compute 5.9, wait 0.4, averaging 0.4, other 0.1)")
    assert "\n" not in format_round_line({"outer_step": 1, "ok": True})  # a record with nothing in it


def test_a_failed_round_says_the_work_carries_over() -> None:
    line = format_round_line({**AVERAGED, "ok": False, "error": "PartialAllReduce: reducer x failed"}, LAST)
    assert "round failed (PartialAllReduce: reducer x failed)" in line and "carries into its next round" in line
    assert lost_work_warning({**AVERAGED, "ok": False}, 50, 50) is None  # not lost: no second line


@pytest.mark.parametrize("mine,runs,why", [
    (200, 50, "its --inner-steps 200 is larger than the run's inner.steps = 50"),
    (50, 50, "the swarm finished the round first (a slower machine, or a late join or restart)"),
])
def test_dropped_work_is_one_warning_that_says_why(mine, runs, why) -> None:
    assert format_round_line(ADOPTED).startswith("outer   9 | adopted the swarm's state")
    warning = lost_work_warning(ADOPTED, mine, runs)
    assert warning.startswith("swarmloco: warning: outer step 9: this peer's 31 inner steps were dropped")
    assert why in warning and "\n" not in warning
    assert lost_work_warning({**ADOPTED, "inner_steps": 0}, mine, runs) is None  # nothing was lost
    assert lost_work_warning(AVERAGED, mine, runs) is None


def test_the_reporter_prints_a_line_per_round_and_nothing_after_a_stop() -> None:
    lines, quiet = [], threading.Event()
    reporter = ConsoleReporter(lines.append, last_round=lambda: LAST, inner_steps=200, run_inner_steps=50, quiet=quiet)
    reporter.round_done(AVERAGED)
    reporter.round_done(ADOPTED)
    assert len(lines) == 3 and lines[0].startswith("outer   7 |") and "warning" in lines[2]
    quiet.set()  # the peer is stopping: a round it left on purpose is no news
    reporter.round_done({**AVERAGED, "ok": False, "error": "left the round"})
    assert len(lines) == 3


@pytest.mark.slow
def test_a_peer_with_a_larger_h_than_the_swarm_is_told_its_work_is_dropped(spawn, write_config) -> None:
    config = write_config(swarm={"ready_timeout": 2.0})
    swarm = spawn("swarm", config)  # two peers: a quorum without the slow one (which one alone could not be)
    spawn("mate", config, initial_peers=swarm.maddrs())
    slow = spawn("slow", config, "--inner-steps", "400", initial_peers=swarm.maddrs(), verbose=False,
                 env={"SWARMLOCO_FAULT": "slow_steps:0.02"})
    adopted = next(r for r in (slow.next_round(timeout=120) for _ in range(5)) if r["adopted"])
    assert adopted["ok"]
    log = slow.log_text()
    assert "--inner-steps 400 is larger than the run's inner.steps = 8" in log  # at start, and per round:
    warnings = [line for line in log.splitlines() if "inner steps were dropped" in line]
    assert warnings and "use --inner-steps 8 or less" in warnings[0], log
    assert "Traceback" not in log
