"""DiLoCo over a swarm, wrapped around the user's own model, inner optimizer and training loop.

    swarm = swarmloco.Swarm("my-run", initial_peers=[...]).start()
    diloco = swarmloco.DiLoCo(swarm, model, partial(torch.optim.AdamW, lr=3e-4), inner_steps=100)
    opt = diloco.inner_optimizer
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        diloco.step(samples=len(x), loss=loss)   # every inner_steps-th call runs the outer round
    diloco.close()

What a peer keeps (DiLoCo, arXiv:2311.08105): ``global_params``, the last agreed model, fp32 on the CPU,
identical bit for bit on every peer of the same rounds, which the outer optimizer (Nesterov momentum)
steps on; and the user's model on its device with the inner optimizer's state, which stays local.

One outer step: inner steps -> pseudo-gradient ``global - local`` -> averaged over the round's peers
(weighted by samples, compressed by the run's codec with error feedback, checked robustly) -> outer step
on ``global_params`` -> the model := global params. A failed round is re-run at once among the survivors
(:mod:`swarmloco.node.sync`); if it still fails, nothing global changes and the model keeps its inner
progress, which the next round's pseudo-gradient carries. Every committed round is certified: each member
signs its header and the certificates chain back to the run's genesis (:mod:`swarmloco.node.lineage`). A
peer whose lineage the swarm outweighs adopts the heavier one at its next :meth:`DiLoCo.step` (proven and
downloaded in the background, :mod:`swarmloco.node.catch_up`), dropping its unfinished inner work.

The **manifest** every peer of the run must share is the model's fingerprint (parameter names, shapes,
dtypes) and its initial parameters' digest (the genesis), ``inner_steps``, the outer, codec and access
settings, and the user's own ``run_config``: a peer with another model is refused in one line naming the
first differing parameter. Build the model identically on every peer (the same seed) and create the
DiLoCo on the fresh model; resume with :meth:`DiLoCo.load_state_dict` (or ``resume=True`` with a
checkpoint directory).

Rounds start after ``inner_steps`` calls of :meth:`DiLoCo.step`, or, with ``outer.target_samples``, as soon
as the live peers at this outer step processed that many samples together (tracked in their heartbeats).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from swarmloco.compression import get_codec
from swarmloco.compression.error_feedback import error_feedback_for
from swarmloco.config import AccessConfig, CheckpointConfig, CodecConfig, OuterConfig
from swarmloco.node.catch_up import CatchUp
from swarmloco.node.heartbeats import Heartbeats
from swarmloco.node.lineage import Chain
from swarmloco.node.membership import Membership
from swarmloco.node.peer_state import PeerState
from swarmloco.node.overlapped import BackgroundRound, land, launch
from swarmloco.node.round import RoundReport, run_round
from swarmloco.node.state_sync import params_digest
from swarmloco.node.status import StatusBoard
from swarmloco.node.sync import Synchronizer
from swarmloco.outer_optim import build_outer_optimizer
from swarmloco.outer_optim.overlap import fragment_partition, round_fragment
from swarmloco.protocol.manifest import RunManifest
from swarmloco.protocol.progress import MAX_ATTEST, ProgressTracker

logger = logging.getLogger(__name__)


def fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> "shape:dtype", in the model's order (part of the manifest)."""
    return {name: f"{'x'.join(map(str, p.shape)) or 'scalar'}:{str(p.dtype).removeprefix('torch.')}"
            for name, p in model.named_parameters()}


@dataclass(frozen=True)
class _Inner:
    steps: int
    samples: int
    seconds: float
    mean_loss: float


class DiLoCo(Heartbeats, PeerState):
    """One peer's DiLoCo over ``swarm`` (see the module doc)."""

    def __init__(self, swarm, model: torch.nn.Module, inner_optimizer, *, inner_steps: int = 50,
                 outer: OuterConfig | None = None, codec: CodecConfig | None = None,
                 access: AccessConfig | None = None, checkpoint: CheckpointConfig | None = None,
                 run_config: dict[str, Any] | None = None, seed: int = 0, resume: bool = False,
                 evaluate: Callable[[], float] | None = None, board: StatusBoard | None = None,
                 manifest: dict[str, Any] | None = None):
        """``inner_optimizer``: a factory ``params -> torch.optim.Optimizer`` (as hivemind and OpenDiLoCo take)
        or an optimizer already built over ``model``'s parameters; ``diloco.inner_optimizer`` is it.
        ``outer``: None takes the defaults, with the lr and momentum ``codec`` was tuned with where it has its
        own (``OuterConfig.for_codec``: ``hadtopk``'s 1.6 / 0.6).
        ``evaluate()``: held-out loss of the model, called after each committed round with the global
        parameters in the model (reported with the round). ``checkpoint``: where and how often to write
        checkpoints (``resume`` starts from the newest). ``run_config``: anything else every peer must
        share (hyperparameters, data recipe), part of the manifest. ``manifest``: the whole shared run
        definition instead (the CLI passes its config's), to which the fingerprint and genesis are added."""
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps={inner_steps!r} is invalid: must be a positive integer")
        self.swarm, self.model, self.H = swarm, model, inner_steps
        self.codec_cfg = codec or CodecConfig()
        self.outer_cfg = outer or OuterConfig.for_codec(self.codec_cfg)  # (unset: the codec's tuned outer step)
        self.outer_cfg.check_inner_steps(inner_steps, "inner_steps")
        self.codec_cfg.check_outer(self.outer_cfg)
        self.steps_per_round = inner_steps // self.outer_cfg.fragments
        """Inner steps between two rounds (a fragment's round with outer.fragments > 1)."""
        self.overlapped = self.outer_cfg.overlapped
        """Rounds run behind the next inner steps (``outer.overlap``: :mod:`swarmloco.node.overlapped`)."""
        self.tau = self.outer_cfg.delay_steps(inner_steps)
        """Inner steps a round runs behind training before it lands at the latest; with ``outer.overlap_steps =
        0`` it lands as soon as its exchange ended."""
        self._land_early = self.overlapped and not self.outer_cfg.overlap_steps

        self.checkpoint_cfg = checkpoint or CheckpointConfig()
        self.resume, self.evaluate_fn = resume, evaluate
        self.board = board or StatusBoard()
        self.stop = swarm.stop  # the user's (or the CLI's signal handler's): ends waits and the loop
        self._halt = threading.Event()  # set by close(): ends this engine's threads, not the swarm's other runs
        self.identity = swarm.identity
        self.inner_optimizer = inner_optimizer if isinstance(inner_optimizer, torch.optim.Optimizer) \
            else inner_optimizer(model.parameters())
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError("the model has no parameters to train")
        names, numels = zip(*((name, p.numel()) for name, p in model.named_parameters()))
        self.parts = fragment_partition(names, numels, self.outer_cfg.fragments)
        """The parameters of each streaming fragment (one part holding all of them without fragments)."""
        self.device = first.device
        pin = self.device.type == "cuda"  # the CPU side of every host<->device copy is pinned: async DMA
        self.global_params = [_cpu_buffer(p, pin).copy_(p.detach()) for p in model.parameters()]
        self._staging = [_cpu_buffer(p, pin) for p in model.parameters()]  # the local params, copied off
        self.digest = params_digest(self.global_params)
        base = manifest if manifest is not None else {
            "run_id": swarm.run_id, "seed": seed, "inner": {"steps": inner_steps},
            "outer": dataclasses.asdict(self.outer_cfg), "codec": dataclasses.asdict(self.codec_cfg),
            "access": dataclasses.asdict(access or AccessConfig()), "run": dict(run_config or {})}
        self.manifest = RunManifest.from_dict({**base, "fingerprint": fingerprint(model), "genesis": self.digest})
        self.outer_opt = build_outer_optimizer(self.global_params, self.outer_cfg)  # the simulator's update rule too
        self.codec = get_codec(self.codec_cfg)
        # topk: decays (SparseLoCo's momentum); rotate, hadtopk: the rest stays in the model
        self.error_feedback = error_feedback_for(self.codec_cfg, self.codec)
        self.transport = swarm.transport_for(self.manifest, templates=self.global_params, codec=self.codec,
                                             clip_factor=self.outer_cfg.clip_factor)
        cfg = swarm.config
        self.cfg_swarm = cfg
        self.outer_step = 0
        self.inner_step = 0
        """Inner steps of this peer's schedule (moves to ``outer_step * inner_steps`` when it adopts a state)."""
        self.membership = Membership(self.manifest, self.transport, self.identity, cfg, self.board)
        self.tracker = ProgressTracker(self.transport, self.manifest.progress_key, cfg.heartbeat_ttl, self.identity,
                                       admits=self.membership.admits, heartbeat_period=cfg.heartbeat_period)
        self.sync = Synchronizer(self.transport, self.tracker, cfg, heartbeat=self._progress, stop=self.stop,
                                 refused=lambda peer_id: self.membership.refused(peer_id, self.outer_step),
                                 behind=self._behind_check)
        self.chain = Chain(self.manifest.hash, 0, bytes.fromhex(self.digest))  # rooted at the run's genesis
        self._attest: deque[tuple[int, bytes]] = deque(maxlen=MAX_ATTEST)  # our signatures of recent rounds
        self._mates: set[str] = set()  # peers of this step's attempts and of our last commit
        self._lock = threading.Lock()  # global params, momentum, outer step and chain change together under it
        self.catchup = CatchUp(
            manifest=self.manifest.hash, transport=self.transport, cfg=cfg, snapshot=self._chain_snapshot,
            counts=self._counts, fetch=lambda: self.sync.live(self.tracker.fetch()),
            blame=lambda peer_id, why: self.membership.exclude(peer_id, self.outer_step, why),
            templates=self.global_params, download_sources=cfg.download_sources, stop=self._halt)
        self.catchup.paused = lambda: self._state == "averaging"
        self._pseudo = [torch.zeros_like(p) for p in self.global_params]
        self._averaged = [torch.zeros_like(p) for p in self.global_params]
        self._samples_since_sync = self._inner_steps = 0
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_n = 0
        self._round_started = time.perf_counter()
        self._phase_blocked = 0.0  # seconds of this inner phase the training loop spent on a landing round
        self._last_landed = self._round_started  # when the last round was reported (overlapped round times)
        self._flying: deque[BackgroundRound] = deque()  # rounds running behind the inner steps, oldest first
        self._next_step = 0  # the outer step of the next round while rounds are in flight (under _step_lock)
        self._step_lock = threading.Lock()
        self._last_sps = 0.0
        self._last_round_bytes: int | None = None
        self._known_peers: set[str] = set()
        self._clock_warned = False  # this machine's clock was said to be off the swarm's (heartbeats.py)
        # asked once (each call is an RPC to the DHT); a peer in client mode announces none: it cannot be dialled
        self._maddrs = () if cfg.client_mode else tuple(self.transport.visible_maddrs()[:4])
        self._state = "joining"
        self._heartbeat_thread: threading.Thread | None = None
        self._round_due = threading.Event()  # target_samples mode: the swarm has done enough samples
        self._swarm_samples = 0
        self._attempt = 0  # which try of the current round (heartbeats say it)
        self._rerun = ""  # why it is re-run ("broken" or "decided", see PeerProgress.rerun)
        self._started = self._closed = False
        self.initial_eval_loss = float("nan")
        self.transport.set_state_provider(self._serve_state)
        self.board.update(
            peer_id=self.transport.peer_id, run_id=self.manifest.run_id, manifest_hash=self.manifest.hash,
            device=str(self.device), inner_steps_per_round=self.steps_per_round, outer_step=0, inner_step=0,
            num_params=sum(p.numel() for p in self.global_params), codec=self.codec.info.name)

    # ----- lifecycle ------------------------------------------------------------------------------
    def start(self) -> DiLoCo:
        """Resume (if asked), check the manifest and access against the swarm's (ManifestMismatch,
        AccessRefused), announce this peer, adopt the swarm's state if its lineage outweighs ours, and
        start the heartbeat and catch-up threads. :meth:`step` calls it the first time."""
        if self._started:
            return self
        self.push_lineage(0)
        if self.resume:
            self.maybe_resume()
        self.membership.announce(wait_s=min(10.0, self.cfg_swarm.ready_timeout))  # refused: nothing to undo
        self._started = True
        self.tracker.publish(self._progress())
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._heartbeat_thread.start()
        if self.catchup.check(self.sync.live(self.tracker.fetch())) is not None:  # a late joiner, an old restart
            taken = self.catchup.take(self._chain_snapshot())
            if taken is not None:
                self.adopt(taken)
        self.catchup.start()
        self.initial_eval_loss = self._evaluate()
        self.board.update(eval_loss=self.initial_eval_loss, initial_eval_loss=self.initial_eval_loss)
        self._set_state("training")
        self._round_started = self._last_landed = time.perf_counter()
        self.tracker.publish(self._progress())
        return self

    def close(self) -> None:
        """Leave the swarm: a last heartbeat saying so, the final checkpoint, the averager stopped."""
        if self._closed:
            return
        self._closed = True
        try:
            while self._flying:  # the rounds in flight land first: the checkpoint then holds them
                self._land_quietly()
        finally:
            self._halt.set()
        try:
            if self._started:
                self._set_state("stopped")
                self.tracker.publish(self._progress())
                self.write_checkpoint()
        finally:
            self.transport.shutdown()

    def __enter__(self) -> DiLoCo:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- the user's loop calls this -----------------------------------------------------------------
    def step(self, samples: int = 1, loss: torch.Tensor | float | None = None) -> RoundReport | None:
        """Count one inner step (``samples`` processed; ``loss``, optional, is averaged into the round's
        report without a device sync per step). Runs the outer round when it is due and returns its report;
        adopts a heavier lineage proven meanwhile (its report has ``adopted``); otherwise returns None."""
        if not self._started:
            self.start()
        self._inner_steps += 1
        self.inner_step += 1
        self._samples_since_sync += int(samples)
        if loss is not None:
            self._loss_sum = self._loss_sum + (loss.detach().float() if isinstance(loss, torch.Tensor) else float(loss))
            self._loss_n += 1
        report = None
        for background in self._flying:
            background.steps += 1
        # the oldest lands exactly tau steps after it started, or (overlap_steps = 0) once its exchange has ended
        while self._flying and (self._flying[0].steps >= self.tau or (self._land_early and self._flying[0].done())):
            report = land(self)
        if self.stop.is_set():
            return report
        if self.catchup.pending is not None:  # adopted once no round is in flight (at the latest when one is due)
            if self._flying and self._round_is_due():
                report = self.wait_for_round()
            if not self._flying:
                return report or self._adopt_pending()
        if self._round_is_due():
            if self.overlapped:
                return launch(self) or report  # runs behind the next inner steps; reported when it lands
            return self.sync_now()
        return report

    def sync_now(self) -> RoundReport:
        """Run the outer round now (with whatever inner steps were done since the last one) and wait for it,
        also with rounds overlapped (a round in flight lands first)."""
        if not self._started:
            self.start()
        if self.overlapped:
            self.wait_for_round()
            report = launch(self)
            return self.wait_for_round() or report
        inner = self._inner_result()
        report = run_round(self, inner)
        self._next_round()
        return report

    @property
    def in_flight(self) -> int | None:
        """The outer step of the newest round running behind the inner steps now (``outer.overlap``), None if
        none; a round lands ``overlap_steps`` steps after it started, or at :meth:`wait_for_round`."""
        return self._flying[-1].work.step if self._flying else None

    def wait_for_round(self) -> RoundReport | None:
        """Land the rounds in flight now (waiting for them if need be) and return the last one's report; None
        if there is none. For a loop that stops: the last round it started is applied before it leaves."""
        report = None
        while self._flying:
            report = land(self)
        return report

    def round_parts(self) -> tuple[int, ...]:
        """The parameters the round of the current outer step syncs: all, or its streaming fragment's."""
        return self.parts[round_fragment(self.outer_step, len(self.parts))]

    def _next_round_step(self) -> int:
        """The outer step of the next round to start: the peer's, or the one after the rounds in flight."""
        with self._step_lock:
            return self._next_step if self._flying else self.outer_step

    def _launched(self, step: int) -> None:
        with self._step_lock:
            self._next_step = step + 1

    def _round_not_committed(self, step: int) -> None:
        """A round in flight ended without a commit: the next one to start is for its step again (the rounds
        started after it meanwhile are not run)."""
        with self._step_lock:
            self._next_step = step

    def _land_quietly(self) -> None:
        """Land the round in flight on the way out (close): its report still goes to the board."""
        try:
            land(self)
        except Exception as e:  # noqa: BLE001 - leaving anyway: the checkpoint holds the last committed round
            logger.warning("the round in flight did not land: %s", str(e) or type(e).__name__)

    @property
    def round_due(self) -> bool:
        """Whether the next :meth:`step` would start a round (or adopt a prepared lineage)."""
        return self.catchup.pending is not None or self._round_is_due(counting_next=True)

    def _round_is_due(self, counting_next: bool = False) -> bool:
        target = self.outer_cfg.target_samples
        if not target:
            return self._inner_steps + (1 if counting_next else 0) >= self.steps_per_round
        return self._round_due.is_set() or self._samples_since_sync + self._swarm_samples >= target

    def _inner_result(self) -> _Inner:
        """The inner phase that just ended; its samples: those since the last committed round that no round in
        flight carries already."""
        seconds = time.perf_counter() - self._round_started
        mean = float(self._loss_sum) / self._loss_n if self._loss_n else float("nan")
        samples = self._samples_since_sync - sum(r.work.weight for r in self._flying)
        if self._inner_steps and seconds > 0:
            self._last_sps = samples / seconds
        self.board.update(inner_steps_total=self.inner_step, train_loss=mean, samples_per_second=self._last_sps,
                          inner_step=self._inner_steps)
        return _Inner(self._inner_steps, samples, seconds, mean)

    def _start_phase(self) -> None:
        """A new inner phase starts now (its steps, samples and loss are counted afresh)."""
        self._inner_steps, self._loss_sum, self._loss_n = 0, 0.0, 0
        self._round_due.clear()
        self._swarm_samples = 0  # the others' count for this step comes with their next heartbeats
        self._round_started = time.perf_counter()
        self._phase_blocked = 0.0

    def _next_round(self) -> None:
        self._start_phase()
        if not self.stop.is_set():
            self._set_state("training")
            self.tracker.publish(self._progress())

    def _adopt_pending(self) -> RoundReport | None:
        taken = self.catchup.take(self._chain_snapshot())
        if taken is None:  # stale: prepared while this peer caught up by another adoption or a round
            return None
        inner = self._inner_result()
        report = self._catch_up_instead_of_round(None, inner, self._round_started, taken=taken)
        self._next_round()
        return report

    def _evaluate(self) -> float:
        return float(self.evaluate_fn()) if self.evaluate_fn is not None else float("nan")

    def _set_state(self, state: str) -> None:
        self._state = state
        self.board.update(state=state)

    # ----- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The global (agreed) state, this peer's inner optimizer state and its lineage: what a checkpoint
        holds (the model's entries are the global parameters; the model itself is not touched)."""
        return self._state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt a :meth:`state_dict` (a checkpoint): the model restarts from its global parameters."""
        self.load_state(state)


def _cpu_buffer(like: torch.Tensor, pin: bool) -> torch.Tensor:
    """An fp32 CPU tensor shaped like ``like`` (page-locked when ``pin``)."""
    return torch.empty(like.shape, dtype=torch.float32, pin_memory=pin)


__all__ = ["DiLoCo", "RoundReport", "fingerprint"]
