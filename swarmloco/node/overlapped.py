"""Rounds that run behind the next inner steps (``outer.overlap = "delayed"`` or ``"eager"``).

A round starts when its inner phase ends (:meth:`InFlight.launch`, in the training loop): the pseudo-gradient
is taken, the eager proxy applied, and the exchange (:meth:`Rounds.exchange`: barrier, averaging, commit
decision, re-runs, outer step and certificate on the global parameters) runs in a thread of its own while
training goes on. Exactly ``tau`` inner steps after the start, or as soon as its exchange ended with
``overlap_steps = 0``, the round lands (:meth:`InFlight.land`, in the training loop; it waits there if the
exchange is not done): the local parameters take the correction of :mod:`swarmloco.outer_optim.overlap`.

With streaming fragments several rounds can be in flight, one per fragment at most, exchanged one after another
in step order (a round needs the certified state of the step before it). A round whose step is no longer the
peer's when its turn comes is not run: it lands as a failed round does. A lineage to adopt waits until every
round in flight has landed. Only the global state changes in the rounds' threads; the model and the inner
optimizer change only in the training loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch

from swarmloco.node.round import RoundReport, Rounds, RoundWork
from swarmloco.outer_optim.overlap import apply_correction, landing_correction, proxy_step, round_fragment
from swarmloco.protocol.interface import RoundOutcome

logger = logging.getLogger(__name__)


class BackgroundRound:
    """The exchange of one round in its own thread, after the exchange of the round before it (if any)."""

    def __init__(self, flight: InFlight, work: RoundWork, before: BackgroundRound | None):
        self.flight, self.work = flight, work
        self.steps = 0
        """Inner steps taken since the round started."""
        self.error: BaseException | None = None
        self._before = before
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"round-{work.step}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        flight, work, before = self.flight, self.work, self._before
        rounds = flight.rounds
        self._before = None  # (no chain of landed rounds is kept alive)
        try:
            if before is not None:
                before._done.wait()  # bounded by that round's own deadlines
            at = rounds.peer.outer_step
            if rounds.stop.is_set() or work.step != at:
                why = "stopping" if rounds.stop.is_set() else f"this peer is at outer step {at}"
                work.outcome = RoundOutcome(ok=False, error=f"not run: {why}")
                logger.info("round for outer step %d not run: %s", work.step, why)
            else:
                rounds.exchange(work)
                if work.behind is not None or not work.outcome.ok:  # the next round is this step's again
                    flight.not_committed(work.step)
        except BaseException as e:  # noqa: BLE001 - handed to the training loop when the round lands
            self.error = e
            flight.not_committed(work.step)
        finally:
            if not rounds.stop.is_set():
                rounds.heartbeats.set_state("training")  # the training loop never stopped
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        """Until the exchange ended (its own deadlines bound it; a stop leaves it within STOP_ROUND_GRACE)."""
        while not self._done.wait(1.0):
            pass
        self._thread.join()


class InFlight:
    """The rounds running behind the inner steps, oldest first, and the outer step of the next one."""

    def __init__(self, rounds: Rounds, tau: int, land_early: bool):
        self.rounds, self.tau, self.land_early = rounds, tau, land_early
        self.queue: deque[BackgroundRound] = deque()
        self._next_step = 0  # the outer step of the next round while rounds are in flight (under _lock)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.queue)

    @property
    def newest_step(self) -> int | None:
        return self.queue[-1].work.step if self.queue else None

    @property
    def carried_samples(self) -> int:
        """Samples the rounds in flight carry already (not the next round's)."""
        return sum(r.work.weight for r in self.queue)

    def stepped(self) -> None:
        """One inner step was taken beside the rounds in flight."""
        for background in self.queue:
            background.steps += 1

    def oldest_due(self) -> bool:
        """The oldest lands exactly tau steps after it started, or (overlap_steps = 0) once its exchange ended."""
        oldest = self.queue[0] if self.queue else None
        return oldest is not None and (oldest.steps >= self.tau or (self.land_early and oldest.done()))

    def next_round_step(self) -> int:
        """The outer step of the next round to start: the peer's, or the one after the rounds in flight."""
        with self._lock:
            return self._next_step if self.queue else self.rounds.peer.outer_step

    def launched(self, step: int) -> None:
        with self._lock:
            self._next_step = step + 1

    def not_committed(self, step: int) -> None:
        """A round in flight ended without a commit: the next one to start is for its step again (the rounds
        started after it meanwhile are not run)."""
        with self._lock:
            self._next_step = step

    @torch.no_grad()
    def launch(self) -> RoundReport | None:
        """Start the round of the inner phase that just ended, in the background. A round of the same fragment
        still in flight lands first (and the rounds before it); the last report of those landings is returned
        (an adoption found by one of them replaces this round)."""
        rounds = self.rounds
        buffers, peer, phase = rounds.buffers, rounds.peer, rounds.phase
        t = time.perf_counter()
        report = None
        while True:
            step = self.next_round_step()
            index = rounds.parts[round_fragment(step, len(rounds.parts))]
            if not any(r.work.index == index for r in self.queue):
                break
            report = self.land()  # its buffers are this round's: it lands first
            if report.adopted:
                return report
        inner = rounds.inner_result(self.carried_samples)
        work = rounds.prepare(inner, index, step=step, weight=inner.samples)
        if rounds.outer.overlap == "eager":  # this peer's own outer step stands in for the group's
            theta = [buffers.global_params[i] for i in work.index]
            proxy = proxy_step(peer.outer_opt, theta, [buffers.pseudo[i] for i in work.index])
            params = list(buffers.model.parameters())
            for i, p in zip(work.index, proxy):
                buffers.staging[i].copy_(p)
                params[i].copy_(buffers.staging[i], non_blocking=True)
            buffers.sync_device()
        # (delayed: the proxy is the local parameters, which pseudo_gradient left in the staging buffers)
        if not self.queue:
            rounds.heartbeats.set_state("ready")
        self.launched(step)
        self.queue.append(BackgroundRound(self, work, self.queue[-1] if self.queue else None))
        phase.restart()
        work.blocked_s = time.perf_counter() - t
        return report

    @torch.no_grad()
    def land(self) -> RoundReport:
        """Apply the oldest round in flight (waiting for it if need be) and report it."""
        rounds = self.rounds
        buffers, phase = rounds.buffers, rounds.phase
        t = time.perf_counter()
        background = self.queue.popleft()
        background.wait()
        if background.error is not None:
            raise background.error
        work = background.work
        work.landed_after = background.steps
        if work.behind is not None:  # the swarm is on a heavier lineage: adopt it (all inner work since is dropped)
            while self.queue:  # the rounds after this one are not run (their step is stale): drop them
                self.queue.popleft().wait()
            report = rounds.adopt(work.behind, work.inner, work.t0)
            phase.restart()
            return report
        alpha = rounds.outer.overlap_alpha
        if work.outcome.ok:
            target = [buffers.global_params[i] for i in work.index]  # the round's certified state
        else:  # as if the round had not run: the local parameters at its start (the next round carries them)
            target = [torch.sub(buffers.global_params[i], buffers.pseudo[i]) for i in work.index]
        proxy = [buffers.staging[i] for i in work.index]
        params = list(buffers.model.parameters())
        for i, c in zip(work.index, landing_correction(target, proxy, alpha, out=proxy)):
            apply_correction(params[i], c, alpha)
        buffers.sync_device()
        if work.outcome.ok:
            phase.landed(work.weight)
        eval_loss = rounds.evaluate_global(work.step + 1) if work.outcome.ok else float("nan")
        spent = time.perf_counter() - t
        phase.blocked += spent
        work.blocked_s += spent
        return rounds.finish(work, eval_loss)

    def land_all(self) -> RoundReport | None:
        """Land every round in flight, oldest first; the last one's report (None if there was none)."""
        report = None
        while self.queue:
            report = self.land()
        return report

    def land_quietly(self) -> None:
        """Land the rounds in flight on the way out (close): their reports still go to the board."""
        while self.queue:
            try:
                self.land()
            except Exception as e:  # noqa: BLE001 - leaving anyway: the checkpoint holds the last committed round
                logger.warning("the round in flight did not land: %s", str(e) or type(e).__name__)


__all__ = ["BackgroundRound", "InFlight"]
