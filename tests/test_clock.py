"""A machine whose clock is off the swarm's learns it from the peers' heartbeats, and says so once."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from swarmloco.node.heartbeats import Heartbeats
from swarmloco.app.console import one_line
from swarmloco.app.metrics import render_metrics
from swarmloco.node.status import StatusBoard
from swarmloco.protocol.clock import TOLERANCE_S, ClockCheck
from swarmloco.protocol.identity import Identity
from swarmloco.protocol.progress import PeerProgress, ProgressTracker

from test_membership import DictTransport

KEY = "sl_test_0123456789abcdef_progress"
PERIOD = 2.0


class Swarm:
    """Peers heartbeating every PERIOD on their own clocks (true time + skew) into one dict DHT."""

    def __init__(self, skews: list[float]):
        self.true_time, self.records = 1_000_000.0, {}
        self.peers = []
        for skew in skews:
            who = Identity.generate()
            clock = lambda skew=skew: self.true_time + skew  # noqa: E731
            self.peers.append((who, clock, ProgressTracker(DictTransport(who, self.records), KEY, 10.0, who, clock)))

    def beat(self) -> None:
        for who, clock, tracker in self.peers:
            tracker.publish(PeerProgress(peer_id=who.libp2p_peer_id(), outer_step=1, state="training", time=clock()))

    def reader(self, skew: float) -> ProgressTracker:
        me = Identity.generate()
        return ProgressTracker(DictTransport(me, self.records), KEY, 10.0, me, lambda: self.true_time + skew,
                               heartbeat_period=PERIOD)

    def run(self, reader: ProgressTracker, beats: int = 6, read_after: float = 0.3) -> None:
        """``beats`` heartbeat periods; the reader reads ``read_after`` seconds after each round of beats."""
        for _ in range(beats):
            self.beat()
            self.true_time += read_after
            reader.fetch()
            self.true_time += PERIOD - read_after


def test_a_clock_in_step_with_the_swarm_raises_nothing() -> None:
    swarm = Swarm([0.0, 0.4, -0.6])
    reader = swarm.reader(0.0)
    swarm.run(reader)
    offset, senders = reader.clock_check.offset()
    assert senders == 3 and abs(offset) < 1.0 and reader.clock_check.problem() is None


def test_a_clock_behind_the_swarm_sees_heartbeats_from_its_future() -> None:
    swarm = Swarm([0.0, 0.2, -0.3])
    reader = swarm.reader(-40.0)  # 40 s behind: the others' heartbeats are dated 40 s after its now
    swarm.run(reader)
    problem = reader.clock_check.problem()
    assert problem is not None and "about 40 s behind the median of 3 peers' clocks" in problem, problem
    assert "timedatectl set-ntp true" in problem


def test_a_clock_ahead_of_the_swarm_within_the_ttl_is_caught_beyond_a_heartbeats_age() -> None:
    swarm = Swarm([0.0, 0.1])
    ahead = swarm.reader(+7.0)  # the others' heartbeats look 7 s old (still inside the 10 s ttl)
    swarm.run(ahead)
    assert "about 7 s ahead of" in (ahead.clock_check.problem() or "")
    # a heartbeat read up to a period after it was sent is only old, not off: no alarm
    swarm = Swarm([0.0, 0.1])
    late = swarm.reader(0.0)
    swarm.run(late, read_after=PERIOD - 0.05)
    assert late.clock_check.problem() is None


def test_one_peer_with_a_wrong_clock_does_not_make_the_others_look_wrong() -> None:
    swarm = Swarm([0.0, 0.2, 60.0])  # the third peer's clock is a minute ahead
    reader = swarm.reader(0.0)
    swarm.run(reader)
    assert reader.clock_check.problem() is None and reader.clock_check.offset()[1] == 3


def test_a_dead_peers_last_heartbeat_is_no_reading() -> None:
    # only a heartbeat that moved since the last read is fresh: a dead peer's record, however old, never counts
    swarm = Swarm([0.0])
    swarm.beat()
    swarm.true_time += 8.0  # the peer died 8 s ago; its heartbeat is still within the ttl
    reader = swarm.reader(0.0)
    reader.fetch()
    reader.fetch()
    assert reader.clock_check.offset() is None


def test_the_readings_of_a_peer_whose_heartbeat_expired_are_dropped() -> None:
    check = ClockCheck(slack=PERIOD)
    check.observe("a", 100.0 + 2 * TOLERANCE_S, 100.0)
    assert check.problem() is not None
    check.forget("a")
    assert check.offset() is None and check.problem() is None


def test_a_peer_says_once_that_its_clock_is_off_and_once_that_it_is_back(caplog) -> None:
    check = ClockCheck(slack=PERIOD)
    node = SimpleNamespace(tracker=SimpleNamespace(clock_check=check), board=StatusBoard(), _clock_warned=False)
    check.observe("a", 130.0, 100.0)  # 30 s behind
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            Heartbeats._check_clock(node)
    snap = node.board.snapshot()
    assert snap["clock_offset_s"] == 30.0 and snap["clock_off"] is True
    assert [e["kind"] for e in snap["events"]] == ["clock"] and "30 s behind" in snap["events"][0]["message"]
    assert sum("clock is about 30 s behind" in r.getMessage() for r in caplog.records) == 1
    assert "swarmloco_clock_offset_seconds 30.0" in render_metrics(snap)
    check.forget("a")
    check.observe("a", 100.2, 100.0)  # synced
    Heartbeats._check_clock(node)
    Heartbeats._check_clock(node)
    snap = node.board.snapshot()
    assert snap["clock_off"] is False and [e["kind"] for e in snap["events"]] == ["clock", "clock"]
    assert "back in step" in snap["events"][1]["message"]


def test_hiveminds_refusal_of_a_clock_off_its_bootstrap_peers_says_what_to_do() -> None:
    # what hivemind's DHT raises when the peer it dials answers a time more than 3 s away (seen with a clock
    # 40 s behind); the launcher and the CLI print every start error through one_line
    refusal = RuntimeError("local time must be within 3 seconds  of others(local: 1796668362.93440, "
                           "peer: 1796668402.93687)")
    line = one_line(refusal)
    assert line.startswith("this machine's clock is about 40 s behind the clock of the peer it dialled"), line
    assert "more than 3 s apart" in line and "timedatectl set-ntp true" in line
    ahead = RuntimeError("local time must be within 3 seconds  of others(local: 1796668402.5, peer: 1796668362.5)")
    assert "about 40 s ahead of" in one_line(ahead)
    assert one_line(RuntimeError("Address already in use")) == "Address already in use"
