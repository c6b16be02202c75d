"""Rounds that run behind the next inner steps (``outer.overlap = "delayed"`` or ``"eager"``).

A round starts when its inner phase ends (:func:`launch`, in the training loop): the pseudo-gradient is taken,
the eager proxy applied, and the exchange (:func:`swarmloco.node.round.exchange`: barrier, averaging, commit
decision, re-runs, outer step and certificate on the global parameters) runs in a thread of its own while the
training loop goes on with the next inner steps. Exactly ``tau`` inner steps after the start, or as soon as its
exchange ended with ``overlap_steps = 0``, the round lands (:func:`land`, in the training loop again; it waits
there if the exchange is not done): the local parameters take the correction of
:mod:`swarmloco.outer_optim.overlap`, the round is reported, a checkpoint written if due.

With streaming fragments several rounds can be in flight, one per fragment at most: a round lands at the latest
when its fragment is due again. Their exchanges run one after another, in step order (each thread waits for the
one before it), since a round needs the certified state of the step before it. A round whose step is no longer
the peer's when its turn comes (the round before it did not commit, or found a heavier lineage) is not run: it
lands as a failed round does, and its fragment's progress goes with that fragment's next round. A lineage to
adopt waits until every round in flight has landed.

Only the global state changes in the rounds' threads, under the engine's lock, so what is served to joiners and
written to checkpoints is always a whole committed round (never a half-applied one); the model and the inner
optimizer change only in the training loop.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from swarmloco.node.round import RoundReport, RoundWork, exchange, finish, prepare
from swarmloco.outer_optim.overlap import apply_correction, landing_correction, proxy_step, round_fragment
from swarmloco.protocol.interface import RoundOutcome

logger = logging.getLogger(__name__)


class BackgroundRound:
    """The exchange of one round in its own thread, after the exchange of the round before it (if any)."""

    def __init__(self, engine, work: RoundWork, before: BackgroundRound | None):
        self.engine, self.work = engine, work
        self.steps = 0
        """Inner steps taken since the round started."""
        self.error: BaseException | None = None
        self._before = before
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"round-{work.step}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        engine, work, before = self.engine, self.work, self._before
        self._before = None  # (no chain of landed rounds is kept alive)
        try:
            if before is not None:
                before._done.wait()  # bounded by that round's own deadlines
            if engine.stop.is_set() or work.step != engine.outer_step:
                why = "stopping" if engine.stop.is_set() else f"this peer is at outer step {engine.outer_step}"
                work.outcome = RoundOutcome(ok=False, error=f"not run: {why}")
                logger.info("round for outer step %d not run: %s", work.step, why)
            else:
                exchange(engine, work)
                if work.behind is not None or not work.outcome.ok:  # the next round is this step's again
                    engine._round_not_committed(work.step)
        except BaseException as e:  # noqa: BLE001 - handed to the training loop when the round lands
            self.error = e
            engine._round_not_committed(work.step)
        finally:
            if not engine.stop.is_set():
                engine._set_state("training")  # the training loop never stopped
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        """Until the exchange ended (its own deadlines bound it; a stop leaves it within STOP_ROUND_GRACE)."""
        while not self._done.wait(1.0):
            pass
        self._thread.join()


@torch.no_grad()
def launch(engine) -> RoundReport | None:
    """Start the round of the inner phase that just ended, in the background (the training loop goes on). A
    round of the same fragment still in flight lands first (and the rounds before it); the last report of
    those landings is returned (an adoption found by one of them replaces this round)."""
    t = time.perf_counter()
    report = None
    while True:
        step = engine._next_round_step()
        index = engine.parts[round_fragment(step, len(engine.parts))]
        if not any(r.work.index == index for r in engine._flying):
            break
        report = land(engine)  # its buffers are this round's: it lands first
        if report.adopted:
            return report
    inner = engine._inner_result()  # (its samples: none that the rounds in flight carry already)
    work = prepare(engine, inner, index, step=step, weight=inner.samples)
    if engine.outer_cfg.overlap == "eager":  # this peer's own outer step stands in for the group's
        theta = [engine.global_params[i] for i in work.index]
        proxy = proxy_step(engine.outer_opt, theta, [engine._pseudo[i] for i in work.index])
        params = list(engine.model.parameters())
        for i, p in zip(work.index, proxy):
            engine._staging[i].copy_(p)
            params[i].copy_(engine._staging[i], non_blocking=True)
        engine._sync_device()
    # (delayed: the proxy is the local parameters, which pseudo_gradient left in engine._staging)
    if not engine._flying:
        engine._set_state("ready")
    engine._launched(step)
    engine._flying.append(BackgroundRound(engine, work, engine._flying[-1] if engine._flying else None))
    engine._start_phase()
    work.blocked_s = time.perf_counter() - t
    return report


@torch.no_grad()
def land(engine) -> RoundReport:
    """Apply the oldest round in flight (waiting for it if need be) and report it."""
    t = time.perf_counter()
    background = engine._flying.popleft()
    background.wait()
    if background.error is not None:
        raise background.error
    work = background.work
    work.landed_after = background.steps
    if work.behind is not None:  # the swarm is on a heavier lineage: adopt it (all inner work since is dropped)
        while engine._flying:  # the rounds after this one are not run (their step is stale): drop them
            engine._flying.popleft().wait()
        report = engine._catch_up_instead_of_round(work.behind, work.inner, work.t0)
        engine._start_phase()
        return report
    alpha = engine.outer_cfg.overlap_alpha
    if work.outcome.ok:
        target = [engine.global_params[i] for i in work.index]  # the round's certified state
    else:  # as if the round had not run: the local parameters at its start (the next round carries them)
        target = [torch.sub(engine.global_params[i], engine._pseudo[i]) for i in work.index]
    proxy = [engine._staging[i] for i in work.index]
    params = list(engine.model.parameters())
    for i, c in zip(work.index, landing_correction(target, proxy, alpha, out=proxy)):
        apply_correction(params[i], c, alpha)
    engine._sync_device()
    if work.outcome.ok:
        engine._samples_since_sync -= work.weight
    eval_loss = engine._evaluate_global(work.step + 1) if work.outcome.ok else float("nan")
    spent = time.perf_counter() - t
    engine._phase_blocked += spent
    work.blocked_s += spent
    return finish(engine, work, eval_loss)


__all__ = ["BackgroundRound", "land", "launch"]
