"""The ready barrier's rules on a scripted swarm (a fake tracker and clock, no network)."""

from __future__ import annotations

from dataclasses import replace

from swarmloco.config import SwarmConfig
from swarmloco.node.sync import STALE_BEATS, VERDICT_WAIT_S, Synchronizer, matchmaking_window
from swarmloco.protocol.progress import PeerProgress
from swarmloco.protocol.interface import RoundOutcome

CFG = SwarmConfig(retry_grace=1.0, next_chunk_timeout=5.0, ready_timeout=60.0, heartbeat_ttl=10.0)


class Swarm:
    """The DHT's progress records, scripted by time: ``views(now)`` returns what a fetch sees."""

    def __init__(self, views):
        self.views, self.now, self.published = views, 0.0, []

    def clock(self) -> float:
        return self.now

    def fetch(self) -> list[PeerProgress]:
        self.now += 0.25  # each poll costs a quarter second of fake time
        return [p for p in self.views(self.now)]

    def publish(self, progress: PeerProgress) -> None:
        self.published.append(progress)


class Transport:
    peer_id = "me"


def sync_for(swarm: Swarm) -> Synchronizer:
    me = PeerProgress(peer_id="me", outer_step=3, state="ready", time=0.0, digest="d")
    return Synchronizer(Transport(), swarm, CFG, heartbeat=lambda: me, clock=swarm.clock, poll_interval=0.0)


def beat(pid: str, state: str, t: float, attempt: int = 0) -> PeerProgress:
    return PeerProgress(peer_id=pid, outer_step=3, state=state, time=t, digest="d", attempt=attempt)


def test_first_round_waits_for_every_live_peer_at_the_step() -> None:
    swarm = Swarm(lambda t: [beat("a", "training" if t < 4 else "ready", t)])
    barrier = sync_for(swarm).wait_for_peers(3)
    assert barrier.ready == ("a", "me") and 4 <= barrier.waited_s < 5 and not barrier.timed_out


def test_rerun_skips_a_broken_reducer_that_never_heartbeats_again() -> None:
    swarm = Swarm(lambda t: [beat("dead", "averaging", 0.0), beat("a", "ready", t, attempt=1)])
    sync = sync_for(swarm)
    swarm.now = 1.0
    sync.note_failure(RoundOutcome(ok=False, error="x", suspects=("dead",)))
    barrier = sync.wait_for_peers(3, attempt=1)
    assert barrier.ready == ("a", "me") and barrier.waited_s < 0.5


def test_rerun_waits_for_a_peer_still_inside_the_failed_allreduce() -> None:
    # "slow" is a live peer whose reducer timed out waiting for the dead peer's parts: it fails 7 s later
    swarm = Swarm(lambda t: [beat("slow", "averaging" if t < 7 else "ready", t, attempt=0 if t < 7 else 1)])
    barrier = sync_for(swarm).wait_for_peers(3, attempt=1)
    assert barrier.ready == ("me", "slow") and 7 <= barrier.waited_s < 8


def test_rerun_waits_only_retry_grace_for_a_dead_peer_it_never_suspected() -> None:
    # this peer abandoned its attempt when a mate re-ran it (so it learned no suspects): the dead reducer's
    # last heartbeat still says "averaging", but no heartbeat came since
    swarm = Swarm(lambda t: [beat("dead", "averaging", 0.0), beat("a", "ready", t, attempt=1)])
    barrier = sync_for(swarm).wait_for_peers(3, attempt=1)
    stale = STALE_BEATS * CFG.heartbeat_period
    assert barrier.ready == ("a", "me") and max(CFG.retry_grace, stale) <= barrier.waited_s < stale + 0.5


def test_rerun_gives_up_on_a_peer_stuck_averaging_after_the_reducer_timeout() -> None:
    swarm = Swarm(lambda t: [beat("stuck", "averaging", t)])
    barrier = sync_for(swarm).wait_for_peers(3, attempt=1)
    bound = CFG.retry_grace + 2 * CFG.next_chunk_timeout + 1.0
    assert barrier.ready == ("me",) and bound <= barrier.waited_s < bound + 0.5 and not barrier.timed_out


def test_rerun_waits_only_retry_grace_for_a_peer_that_went_back_to_training() -> None:
    swarm = Swarm(lambda t: [beat("other", "training", t)])
    barrier = sync_for(swarm).wait_for_peers(3, attempt=1)
    assert barrier.ready == ("me",) and CFG.retry_grace <= barrier.waited_s < CFG.retry_grace + 0.5


def test_a_suspect_that_heartbeats_again_is_welcome_back() -> None:
    swarm = Swarm(lambda t: [beat("woke", "ready", 0.0 if t < 3 else t)])
    sync = sync_for(swarm)
    swarm.now = 1.0
    sync.note_failure(RoundOutcome(ok=False, error="x", suspects=("woke",)))
    assert [p.peer_id for p in sync.live(swarm.fetch())] == []
    swarm.now = 3.0
    assert [p.peer_id for p in sync.live(swarm.fetch())] == ["woke"]
    assert "woke" not in sync.suspects


def test_a_claim_ahead_is_no_reason_to_wait_or_adopt_without_a_verdict() -> None:
    ahead = replace(beat("a", "training", 0.0), outer_step=5, digest="x")
    barrier = sync_for(Swarm(lambda t: [ahead])).wait_for_peers(3)
    assert barrier.behind is None and barrier.ready == ("me",) and barrier.waited_s < 0.5


def test_a_proven_heavier_lineage_makes_the_barrier_return_behind() -> None:
    sync = sync_for(Swarm(lambda t: [beat("a", "training", t)]))
    sync.behind = lambda peers, mates_only: ("prepared adoption", False)
    assert sync.wait_for_peers(3).behind == "prepared adoption"


def test_the_barrier_waits_a_bounded_time_for_the_verdict_on_a_mates_claim() -> None:
    swarm = Swarm(lambda t: [])
    sync = sync_for(swarm)
    sync.behind = lambda peers, mates_only: (None, swarm.now < 2.0)  # the verdict comes after 2 s
    barrier = sync.wait_for_peers(3)
    assert barrier.ready == ("me",) and 2.0 <= barrier.waited_s < 2.5
    sync.behind = lambda peers, mates_only: (None, True)  # it never comes: the barrier goes on
    barrier = sync.wait_for_peers(3)
    assert barrier.ready == ("me",) and VERDICT_WAIT_S <= barrier.waited_s < VERDICT_WAIT_S + 0.5


def test_a_peer_at_the_step_on_another_lineage_is_not_waited_for() -> None:
    # (a fork, or a signed claim of this step with a digest nobody serves: the catch-up judges it)
    other = replace(beat("claimer", "training", 0.0), digest="e")
    swarm = Swarm(lambda t: [replace(other, time=t), beat("a", "training" if t < 2 else "ready", t)])
    barrier = sync_for(swarm).wait_for_peers(3)
    assert barrier.ready == ("a", "me") and 2 <= barrier.waited_s < 3 and not barrier.timed_out


def test_a_group_of_members_on_different_parent_states_does_not_commit() -> None:
    outcome = RoundOutcome(ok=True, gathered={f"p{i}": {"outer_step": 3, "live": ["p0", "p1"], "parent": d}
                                              for i, d in enumerate("de")})
    mixed = Synchronizer.decide(outcome, 3)
    assert not mixed.ok and "parent" in mixed.error
    same = RoundOutcome(ok=True, gathered={f"p{i}": {"outer_step": 3, "live": ["p0", "p1"], "parent": "d"}
                                           for i in range(2)})
    assert Synchronizer.decide(same, 3).ok


def gathered(n_group: int, live: list[str]) -> RoundOutcome:
    return RoundOutcome(ok=True, gathered={f"p{i}": {"outer_step": 3, "samples": 8, "live": live}
                                           for i in range(n_group)})


def test_a_round_commits_only_with_more_than_half_of_the_live_peers() -> None:
    everyone = [f"p{i}" for i in range(4)]
    assert Synchronizer.decide(gathered(3, everyone), 3).ok  # a survivors' re-run of 3 of 4
    lone = Synchronizer.decide(gathered(1, everyone), 3)  # a survivor that re-runs alone
    assert not lone.ok and "no quorum" in lone.error
    assert not Synchronizer.decide(gathered(2, everyone), 3).ok  # half is not a majority (2 vs 2 split)
    assert Synchronizer.decide(gathered(1, ["p0"]), 3).ok  # a peer alone in the swarm trains on


def test_the_quorum_counts_every_members_view() -> None:
    outcome = RoundOutcome(ok=True, gathered={"p0": {"outer_step": 3, "live": ["p0", "p1"]},
                                              "p1": {"outer_step": 3, "live": ["p0", "p1", "p2", "p3", "p4"]}})
    assert not Synchronizer.decide(outcome, 3).ok  # p1 sees 5 live peers: a group of 2 is no quorum
    assert Synchronizer.decide(outcome, 3, max_group_size=3).ok  # groups can never be larger than 3


class Handle:
    """A round in flight that finishes (ok) at ``done_at`` unless it is aborted before."""

    def __init__(self, swarm: Swarm, done_at: float = float("inf")):
        self.swarm, self.done_at, self.aborted = swarm, done_at, None

    def done(self):
        return self.aborted is not None or self.swarm.now >= self.done_at

    def wait(self, timeout):
        return self.done()

    def abort(self, reason):
        self.aborted = reason

    def result(self):
        return RoundOutcome(ok=False, error=self.aborted) if self.aborted else gathered(2, ["p0", "p1"])


def test_a_round_is_abandoned_once_a_mate_heartbeats_its_rerun() -> None:
    swarm = Swarm(lambda t: [replace(beat("a", "averaging" if t < 1 else "ready", t, attempt=0 if t < 1 else 1),
                                     rerun="" if t < 1 else "broken")])
    handle = Handle(swarm)
    outcome = sync_for(swarm).wait(handle, 3, 0, ("a", "me"))
    assert not outcome.ok and "re-runs" in handle.aborted and 1.0 <= swarm.now < 1.5


def test_a_peer_abandoning_its_attempt_learns_the_rerunning_mates_suspects_and_does_not_wait_for_them() -> None:
    # "a" saw the dead reducer's stream break and re-runs naming it; this peer was still waiting inside the
    # attempt (it learned no suspects itself): its re-run must not wait for the dead reducer's last heartbeat
    # (still "averaging", attempt 0) to go stale
    rerun = lambda t: replace(beat("a", "ready", t, attempt=1), rerun="broken",  # noqa: E731
                              suspects=("dead", "stranger", "me"))
    swarm = Swarm(lambda t: [beat("dead", "averaging", 0.0), rerun(t)])
    sync = sync_for(swarm)
    outcome = sync.wait(Handle(swarm), 3, 0, ("a", "dead", "me"))
    assert not outcome.ok and set(sync.suspects) == {"dead"}  # not this peer, nor one outside the attempt
    assert sync.named_suspects() == ("dead",)  # ... and its own re-run's heartbeat names it in turn
    swarm.now = 0.0
    barrier = sync.wait_for_peers(3, attempt=1)
    assert barrier.ready == ("a", "me") and barrier.waited_s < 0.5  # (without the hint: STALE_BEATS periods)


def test_a_live_peer_named_falsely_by_a_rerunning_mate_is_alive_again_at_its_next_heartbeat() -> None:
    rerun = lambda t: replace(beat("liar", "ready", t, attempt=1), rerun="broken", suspects=("b",))  # noqa: E731
    swarm = Swarm(lambda t: [rerun(t), beat("b", "averaging" if t < 2 else "ready", t, attempt=0 if t < 2 else 1)])
    sync = sync_for(swarm)
    sync.wait(Handle(swarm), 3, 0, ("liar", "b", "me"))
    assert "b" in sync.suspects
    barrier = sync.wait_for_peers(3, attempt=1)  # b's next heartbeat clears it: the re-run waits for it
    assert barrier.ready == ("b", "liar", "me") and "b" not in sync.suspects


def test_a_mate_whose_own_group_decided_not_to_commit_does_not_make_this_group_give_up() -> None:
    # "a" was at our barrier, then matched into a small group that had no quorum: it re-runs, but it was never
    # in our all-reduce, which goes on and commits
    swarm = Swarm(lambda t: [replace(beat("a", "averaging" if t < 1 else "ready", t, attempt=0 if t < 1 else 1),
                                     rerun="" if t < 1 else "decided")])
    handle = Handle(swarm, done_at=3.0)
    outcome = sync_for(swarm).wait(handle, 3, 0, ("a", "me", "b"))
    assert outcome.ok and handle.aborted is None and swarm.now >= 3.0


def test_no_quorum_and_mixed_states_are_decided_failures_a_broken_allreduce_is_not() -> None:
    everyone = [f"p{i}" for i in range(4)]
    assert Synchronizer.decide(gathered(1, everyone), 3).decided
    mixed = RoundOutcome(ok=True, gathered={"p0": {"outer_step": 3}, "p1": {"outer_step": 2}})
    assert Synchronizer.decide(mixed, 3).decided
    assert not Synchronizer.decide(RoundOutcome(ok=False, error="reducer died"), 3).decided


def test_a_reruns_matchmaking_window_grows_with_each_attempt_up_to_a_bound() -> None:
    assert [matchmaking_window(2.0, a) for a in range(6)] == [2.0, 4.0, 6.0, 8.0, 8.0, 8.0]


def test_next_round_waits_for_a_peer_finishing_the_last_one_but_not_for_one_stuck_in_its_failed_attempt() -> None:
    finishing = [replace(beat("slow", "averaging", 0.0), outer_step=2, attempt=1)]
    swarm = Swarm(lambda t: [replace(p, time=t) if t < 3 else replace(beat("slow", "ready", t)) for p in finishing])
    sync = sync_for(swarm)
    sync.committed(2, attempt=1)  # we committed step 2 at the re-run, as it is about to
    barrier = sync.wait_for_peers(3)
    assert barrier.ready == ("me", "slow") and 3 <= barrier.waited_s < 4

    stuck = Swarm(lambda t: [replace(beat("stuck", "averaging", t), outer_step=2, attempt=0)])
    sync = sync_for(stuck)
    sync.committed(2, attempt=1)  # step 2 failed at attempt 0 and we committed it at the re-run
    barrier = sync.wait_for_peers(3)
    assert barrier.ready == ("me",) and barrier.waited_s < 0.5


def test_a_mate_that_answered_an_error_is_named_but_is_no_suspect_so_the_rerun_waits_for_it() -> None:
    # (its reducer failed because of the dead peer and said so: alive, it re-runs the round with us)
    from swarmloco.protocol.errors import PeerAnswered, RoundFailures

    failures = RoundFailures("reducer")
    failures.record("12D3KooWdeadpeer", ConnectionResetError("Connection lost"))
    failures.record("12D3KooWlivemate", PeerAnswered("12D3KooWlivemate sent INTERNAL_ERROR"))
    error = failures.error("only 69.4% of values were averaged")
    assert error.suspects == ("12D3KooWdeadpeer",) and error.slow == () and error.rejected == ()
    assert "deadpeer failed" in str(error) and "livemate answered an error" in str(error), str(error)

    swarm = Swarm(lambda t: [beat("12D3KooWlivemate", "training" if t < 0.6 else "ready", t, attempt=1)])
    sync = sync_for(swarm)
    sync.note_failure(RoundOutcome(ok=False, error=str(error), suspects=error.suspects))
    barrier = sync.wait_for_peers(3, attempt=1)
    assert barrier.ready == ("12D3KooWlivemate", "me") and barrier.waited_s < CFG.retry_grace
