"""One sync round: wait for the round's peers, average pseudo-gradients, decide whether it commits.

For outer step ``r`` (ARCHITECTURE.md, "The life of one outer step"):

1. **Ready barrier**: every live peer at step ``r`` on the same state is ready (before the first round, at
   least ``swarm.min_peers``), bounded by ``swarm.ready_timeout``; a peer at ``r`` on another lineage is left
   to the catch-up (:mod:`swarmloco.node.catch_up`), which may return ``behind`` instead.
2. **Averaging**: ``Transport.start_round`` (matchmaking in :func:`matchmaking_window`, the exact all-reduce),
   weighted by samples; the handle is waited on later, so training may go on beside it.
3. **Commit decision** from the gathered metadata every member shares: all members at ``r`` on the same parent
   state, and a **quorum** (more than half of the live peers any member saw); else a :class:`RoundOutcome`
   with ``ok=False``. A peer alone in the swarm commits its own pseudo-gradient.

**Re-runs** (at once, up to ``swarm.round_retries``): reducers whose stream broke are *suspects*, not waited for
until they heartbeat again; peers still inside the failed attempt get a bounded grace. A mate heartbeating a
``broken`` re-run of the step ends this peer's attempt (:meth:`Synchronizer.wait`) and hands over its suspects
(:meth:`Synchronizer.take_hint`: a hint, not proof); a ``decided`` one (no quorum in another group) does not.
A re-run commits only with a quorum.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from swarmloco.config import SwarmConfig
from swarmloco.protocol import faults
from swarmloco.protocol.progress import MAX_SUSPECTS, PeerProgress, ProgressTracker
from swarmloco.protocol.interface import RoundHandle, RoundOutcome, Transport

logger = logging.getLogger(__name__)

READY_STATES = ("ready", "averaging")
VERDICT_WAIT_S = 5.0
"""How long a barrier waits for the verdict on a recent group mate's lineage claim before going on."""
STALE_BEATS = 3
"""A re-run waits past ``retry_grace`` only for peers heard from within this many heartbeat periods."""
MAX_WINDOW_FACTOR = 4
"""A re-run's matchmaking window grows up to this many times ``swarm.matchmaking_time``."""


@dataclass(frozen=True)
class BarrierResult:
    ready: tuple[str, ...]
    """Peer ids ready for this round (this peer included)."""
    waited_s: float
    timed_out: bool
    behind: Any = None
    leader: str | None = None
    """The group's leader all the ready peers agree on: the smallest id of those others can dial (a peer in
    client mode, behind NAT, announces no address and cannot lead); None if none can."""
    """Set (a :class:`~swarmloco.node.catch_up.Pending`) when a heavier lineage is proven and its state
    downloaded: adopt it instead of averaging."""


def matchmaking_window(matchmaking_time: float, attempt: int) -> float:
    """How long the round's leader waits for its group at most: ``matchmaking_time``, once more for each
    re-run (up to 4x). A group whose expected peers all joined starts at once, so the longer window only
    costs time when a group is not full - which is when, on slow links or a loaded machine, matchmaking
    splits the round's peers into groups too small for a quorum."""
    return matchmaking_time * min(1 + attempt, MAX_WINDOW_FACTOR)


BARRIER_POLLS_PER_SECOND = 40.0
"""Reads of the heartbeats per second that all peers of a swarm waiting at a barrier make together."""
MIN_POLL_S = 0.05


def barrier_poll_interval(peers: int, longest: float) -> float:
    """How long a barrier waits between two reads of the heartbeats: 50 ms in a small swarm (the last peer to
    arrive is seen within it), longer in a large one so that the swarm's DHT reads per second stay about
    ``BARRIER_POLLS_PER_SECOND``; at most ``longest``."""
    return min(longest, max(MIN_POLL_S, max(1, peers) / BARRIER_POLLS_PER_SECOND))


def same_state(theirs: str, mine: str) -> bool:
    """Whether two heartbeats' digests (prefixes of the same length, or missing) name the same state."""
    return not theirs or not mine or theirs == mine


class _LocalRound:
    """A round of one: no network, the peer's own pseudo-gradient is the average."""

    def __init__(self, tensors: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], peer_id: str, gather: dict):
        for out, t in zip(outputs, tensors):
            out.copy_(t)
        self.outcome = RoundOutcome(ok=True, gathered={peer_id: gather})

    def done(self) -> bool:
        return True

    def wait(self, timeout: float) -> bool:
        return True

    def abort(self, reason: str) -> None:
        pass

    def result(self) -> RoundOutcome:
        return self.outcome


class Synchronizer:
    """Runs sync rounds for one peer over a :class:`Transport`."""

    def __init__(self, transport: Transport, tracker: ProgressTracker, cfg: SwarmConfig,
                 heartbeat: Callable[[], PeerProgress], stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.time, poll_interval: float = 0.2,
                 refused: Callable[[str], bool] | None = None,
                 behind: Callable[[Sequence[PeerProgress], bool], tuple[Any, bool]] | None = None):
        """``refused(peer_id)``: peers this one does not average with now (excluded, see membership.py).
        ``behind(peers, mates_only)`` -> (a prepared adoption or None, whether a verdict on a claim of a
        recent group mate is still due): the catch-up's answer (:mod:`swarmloco.node.catch_up`)."""
        self.transport, self.tracker, self.cfg = transport, tracker, cfg
        self.refused = refused or (lambda peer_id: False)
        self.behind = behind or (lambda peers, mates_only: (None, False))
        self.heartbeat = heartbeat
        self.stop = stop or threading.Event()
        self.clock, self.poll_interval = clock, poll_interval
        self.rounds_joined = 0
        self.suspects: dict[str, float] = {}
        """Peers that failed a round -> when; ignored until they heartbeat after that time."""
        self.last_commit, self.last_commit_attempt = -1, 0
        """The outer step this peer last committed, and at which attempt of its round."""
        self.last_view: list[str] = [transport.peer_id]
        """The live peers the last barrier saw (sent with the round: the quorum counts them)."""

    # ----- who failed ---------------------------------------------------------------------------
    def note_failure(self, outcome: RoundOutcome) -> None:
        """Remember the round's failed reducers until they heartbeat again."""
        now = self.clock()
        for peer_id in outcome.suspects:
            if peer_id != self.transport.peer_id:
                self.suspects[peer_id] = now

    def named_suspects(self) -> tuple[str, ...]:
        """The peers suspected now, as a re-run's heartbeat names them (``PeerProgress.suspects``)."""
        return tuple(sorted(list(self.suspects)))[:MAX_SUSPECTS]  # (list(): the heartbeat thread may pop one)

    def take_hint(self, rerun: PeerProgress, members: Sequence[str]) -> None:
        """A mate re-runs the attempt this peer is giving up: its suspects among the attempt's members become
        this peer's too, so that its re-run need not wait for a dead reducer's last heartbeat to go stale. A
        hint, not proof: a live peer named falsely is alive again at its next heartbeat (:meth:`live`)."""
        now = self.clock()
        for peer_id in rerun.suspects:
            if peer_id in members and peer_id not in (self.transport.peer_id, rerun.peer_id):
                self.suspects.setdefault(peer_id, now)

    def live(self, peers: Sequence[PeerProgress]) -> list[PeerProgress]:
        """Peers minus suspects and refused peers; a suspect that heartbeats after it was suspected is alive
        again."""
        out = []
        for p in peers:
            if p.peer_id != self.transport.peer_id and self.refused(p.peer_id):
                continue
            since = self.suspects.get(p.peer_id)
            if since is not None and p.time > since:
                self.suspects.pop(p.peer_id, None)
                since = None
            if since is None:
                out.append(p)
        return out

    def quorum_view(self, peers: Sequence[PeerProgress]) -> list[str]:
        """The live peers a round's quorum counts: heartbeating, not joining, not excluded (and this one)."""
        me = self.transport.peer_id
        return sorted({p.peer_id for p in peers if p.state != "joining" and not self.refused(p.peer_id)} | {me})

    # ----- the barrier --------------------------------------------------------------------------
    def wait_for_peers(self, outer_step: int, attempt: int = 0) -> BarrierResult:
        """Block until the round's peers are ready (bounded by ready_timeout; a re-run see _rerun_waits_for)."""
        start = self.clock()
        deadline = start + self.cfg.ready_timeout
        need = self.cfg.min_peers if self.rounds_joined == 0 else 1
        me = self.transport.peer_id
        verdict_until = start + min(self.cfg.ready_timeout, VERDICT_WAIT_S)
        published = -float("inf")
        while True:
            mine = replace(self.heartbeat(), state="ready", outer_step=outer_step, attempt=attempt, time=self.clock())
            if mine.time - published >= self.cfg.heartbeat_period / 2:  # (the heartbeat thread says it too)
                self.tracker.publish(mine)
                published = mine.time
            seen = self.tracker.fetch()
            peers = self.live(seen)
            self.last_view = self.quorum_view(seen)
            pending, verdict_due = self.behind(peers, True)
            if pending is not None:
                return BarrierResult((me,), self.clock() - start, timed_out=False, behind=pending)
            # a peer at this step on another lineage (another digest: a fork, or a claim being checked in the
            # background) cannot average with this one: not waited for, not in the round
            at_step = [mine] + [p for p in peers if p.peer_id != me and p.outer_step == outer_step
                                and same_state(p.digest, mine.digest)]
            ready = sorted({p.peer_id for p in at_step if p.state in READY_STATES and p.attempt >= attempt} | {me})
            # peers still finishing the previous round will be at this step in a moment: wait for them too,
            # unless they are still in an attempt of it that failed for us (stuck in a doomed round: they
            # fail, find us ahead and catch up by state download instead)
            finishing = [p for p in peers if p.outer_step == outer_step - 1 and p.state in READY_STATES
                         and not (self.last_commit == outer_step - 1 and p.attempt < self.last_commit_attempt)]
            waiting_for = [p.peer_id for p in at_step + finishing if p.peer_id not in ready]
            if attempt > 0:
                waiting_for = self._rerun_waits_for(at_step, waiting_for, self.clock() - start)
            if verdict_due and self.clock() < verdict_until:  # a mate is ahead: is its lineage ours to take?
                waiting_for = waiting_for or ["(verdict on a group mate's lineage)"]
            leader = min((p.peer_id for p in at_step if p.peer_id in ready and p.maddrs), default=None)
            if len(ready) >= need and not waiting_for:
                return BarrierResult(tuple(ready), self.clock() - start, timed_out=False, leader=leader)
            if self.clock() >= deadline or self.stop.is_set():
                logger.info("ready barrier for outer step %d timed out after %.1fs: %d ready, waiting for %s",
                            outer_step, self.clock() - start, len(ready), [p[:12] for p in waiting_for] or f"{need} peers")
                return BarrierResult(tuple(ready), self.clock() - start, timed_out=True, leader=leader)
            self.stop.wait(barrier_poll_interval(len(seen), self.poll_interval))

    def _rerun_waits_for(self, at_step: Sequence[PeerProgress], waiting_for: list[str], elapsed: float) -> list[str]:
        """Whom a re-run still waits for: everyone for ``retry_grace``; then only the round's peers still
        inside the failed all-reduce (heartbeating ``averaging``), which fail within the reducer timeout
        (2 x next_chunk_timeout) and join. Frozen or dead ones stop heartbeating: not waited for once their
        last heartbeat is ``STALE_BEATS`` periods old (the heartbeat thread beats while averaging too)."""
        if elapsed < self.cfg.retry_grace:
            return waiting_for
        if elapsed >= self.cfg.retry_grace + 2 * self.cfg.next_chunk_timeout + 1.0:
            return []
        fresh = self.clock() - STALE_BEATS * self.cfg.heartbeat_period
        averaging = {p.peer_id for p in at_step if p.state == "averaging" and p.time >= fresh}
        return [pid for pid in waiting_for if pid in averaging]

    def start(self, outer_step: int, tensors: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
              samples: int, attempt: int = 0, parts: Sequence[int] | None = None) -> tuple[RoundHandle | None, BarrierResult]:
        """Barrier, then begin averaging ``tensors`` into ``outputs``; returns at once after the barrier.
        ``parts``: which of the run's parameters the tensors are (a streaming fragment), None: all.

        The handle is None when the barrier found this peer behind the swarm (``barrier.behind``).
        """
        barrier = self.wait_for_peers(outer_step, attempt)
        if barrier.behind is not None:
            return None, barrier
        self.rounds_joined += 1
        gather = {"outer_step": int(outer_step), "samples": int(samples), "live": self.last_view,
                  "parent": self.heartbeat().digest}
        if len(barrier.ready) <= 1:
            return _LocalRound(tensors, outputs, self.transport.peer_id, gather), barrier
        faults.maybe_hang_at_barrier()  # (tests: a crash right when the mates ask this peer to lead)
        self.tracker.publish(replace(self.heartbeat(), state="averaging", outer_step=outer_step, attempt=attempt,
                                     time=self.clock()))
        window = matchmaking_window(self.cfg.matchmaking_time, attempt)
        scheduled = self.clock() + window
        find_timeout = window + 2 * self.cfg.request_timeout + 5.0
        # weighted by samples; a peer that did no step since the last round still takes part (to stay in
        # sync) with a weight that leaves the average as it is
        handle = self.transport.start_round(tensors, outputs, weight=max(1e-3, float(samples)), gather=gather,
                                            scheduled_time=scheduled, timeout=find_timeout,
                                            expected_group_size=len(barrier.ready), parts=parts,
                                            members=barrier.ready, leader=barrier.leader, step=outer_step)
        return handle, barrier

    def committed(self, outer_step: int, attempt: int) -> None:
        """This peer committed ``outer_step`` at ``attempt`` (the next barrier uses it)."""
        self.last_commit, self.last_commit_attempt = outer_step, attempt

    def wait(self, handle: RoundHandle, outer_step: int, attempt: int, members: Sequence[str]) -> RoundOutcome:
        """The round's outcome; the attempt is abandoned as soon as a mate of this step waits at the barrier of
        a later attempt (it failed for them: waiting out its timeouts would only stall this peer)."""
        mates = set(members) - {self.transport.peer_id}
        while mates and not handle.wait(max(self.poll_interval, 0.05)):  # (returns as soon as the round ends)
            if self.stop.is_set():
                break
            # a mate at the barrier of a later attempt of this step gave this one up; one already averaging
            # that later attempt may be in this very group (it came to this round from a re-run of its own)
            # (one whose own group decided not to commit was in another group: ours may still commit)
            rerun = next((p for p in self.tracker.fetch() if p.peer_id in mates and p.outer_step == outer_step
                          and p.attempt > attempt and p.state == "ready" and p.rerun != "decided"), None)
            if rerun is not None and not handle.done():
                self.take_hint(rerun, members)
                logger.info("outer step %d: peer %s already re-runs the round: abandoning attempt %d",
                            outer_step, rerun.peer_id[-8:], attempt)
                handle.abort(f"peer {rerun.peer_id[-8:]} already re-runs outer step {outer_step}")
                break
        return self.decide(handle.result(), outer_step, self.cfg.max_group_size)

    @staticmethod
    def decide(outcome: RoundOutcome, outer_step: int, max_group_size: int = 1 << 30) -> RoundOutcome:
        """Commit only if every group member averaged the same outer step and the group is a quorum of the
        live peers its members saw (all members decide alike: they hold the same gathered metadata)."""
        if not outcome.ok:
            return outcome
        steps = {m.get("outer_step") for m in outcome.gathered.values()}
        if steps != {outer_step}:
            return replace(outcome, ok=False, decided=True, error=f"group mixed outer steps {sorted(map(str, steps))}")
        parents = {m.get("parent") for m in outcome.gathered.values()}
        if len(parents) > 1:  # members on different lineages at the same step: their average is no round
            return replace(outcome, ok=False, decided=True,
                           error="group mixed parent states (members on different lineages)")
        live = set(outcome.gathered)
        for m in outcome.gathered.values():
            seen = m.get("live")
            if isinstance(seen, list):
                live.update(str(p) for p in seen[:4096])
        base = min(len(live), max_group_size)
        if 2 * len(outcome.gathered) <= base:
            return replace(outcome, ok=False, decided=True, error=f"no quorum: {len(outcome.gathered)} of {len(live)} live peers "
                                                    "in the group (a round needs more than half)")
        return outcome
