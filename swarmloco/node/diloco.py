"""DiLoCo over a swarm, wrapped around the user's own model, inner optimizer and training loop.

The user calls :meth:`DiLoCo.step` after each inner optimizer step (or :meth:`DiLoCo.attach` once); every
``inner_steps``-th call runs the outer round (docs/api.md; a whole peer: examples/own_model.py). ``DiLoCo``
wires the parts that do the work, each owning its state (ARCHITECTURE.md, "The engine", has their table).
Every peer of a run shares its manifest: the model's fingerprint and initial digest, ``inner_steps``, the
outer, codec and access settings and ``run_config``; build the model identically (the same seed) on every peer.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from swarmloco.compression import get_codec
from swarmloco.compression.error_feedback import error_feedback_for
from swarmloco.config import AccessConfig, CheckpointConfig, CodecConfig, OuterConfig
from swarmloco.node.buffers import RoundBuffers
from swarmloco.node.catch_up import CatchUp
from swarmloco.node.heartbeats import Heartbeats
from swarmloco.node.membership import Membership
from swarmloco.node.overlapped import InFlight
from swarmloco.node.peer_state import PeerState
from swarmloco.node.phase import InnerPhase
from swarmloco.node.round import RoundReport, Rounds
from swarmloco.node.state_sync import params_digest
from swarmloco.node.status import StatusBoard
from swarmloco.node.sync import Synchronizer
from swarmloco.outer_optim import build_outer_optimizer
from swarmloco.outer_optim.overlap import fragment_partition, round_fragment
from swarmloco.protocol.manifest import RunManifest
from swarmloco.protocol.progress import ProgressTracker


def fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> "shape:dtype", in the model's order (part of the manifest)."""
    return {name: f"{'x'.join(map(str, p.shape)) or 'scalar'}:{str(p.dtype).removeprefix('torch.')}"
            for name, p in model.named_parameters()}


class DiLoCo:
    """One peer's DiLoCo over ``swarm`` (see the module doc); the first :meth:`step` calls :meth:`start`."""

    def __init__(self, swarm, model: torch.nn.Module, inner_optimizer, *, inner_steps: int = 50,
                 outer: OuterConfig | None = None, codec: CodecConfig | None = None,
                 access: AccessConfig | None = None, checkpoint: CheckpointConfig | None = None,
                 run_config: dict[str, Any] | None = None, seed: int = 0, resume: bool = False,
                 evaluate: Callable[[], float] | None = None, board: StatusBoard | None = None,
                 manifest: dict[str, Any] | None = None):
        """``inner_optimizer``: a factory ``params -> Optimizer`` or one built over ``model``'s parameters.
        ``outer``: None takes the defaults, with the step ``codec`` was tuned with (``OuterConfig.for_codec``).
        ``evaluate()``: held-out loss, called after each committed round with the global parameters in the model.
        ``checkpoint``: where and how often (``resume``: start from the newest). ``run_config``: anything else
        every peer must share; ``manifest``: the whole shared run definition instead (the CLI's config)."""
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps={inner_steps!r} is invalid: must be a positive integer")
        self.swarm, self.model, self.H = swarm, model, inner_steps
        self.codec_cfg = codec or CodecConfig()
        self.outer_cfg = outer or OuterConfig.for_codec(self.codec_cfg)
        self.outer_cfg.check_inner_steps(inner_steps, "inner_steps")
        self.codec_cfg.check_outer(self.outer_cfg)
        self.steps_per_round = inner_steps // self.outer_cfg.fragments
        """Inner steps between two rounds (a fragment's round with outer.fragments > 1)."""
        self.overlapped = self.outer_cfg.overlapped
        self.resume, self.board = resume, board or StatusBoard()
        self.stop = swarm.stop  # the user's (or the CLI's signal handler's): ends waits and the loop
        self._halt = threading.Event()  # set by close(): ends this engine's threads, not the swarm's other runs
        self.identity, cfg = swarm.identity, swarm.config
        self.buffers = RoundBuffers(model)
        self.inner_optimizer = inner_optimizer if isinstance(inner_optimizer, torch.optim.Optimizer) \
            else inner_optimizer(model.parameters())
        names, numels = zip(*((name, p.numel()) for name, p in model.named_parameters()))
        self.parts = fragment_partition(names, numels, self.outer_cfg.fragments)
        """The parameters of each streaming fragment (one part holding all of them without fragments)."""
        base = manifest if manifest is not None else {
            "run_id": swarm.run_id, "seed": seed, "inner": {"steps": inner_steps},
            "outer": dataclasses.asdict(self.outer_cfg), "codec": dataclasses.asdict(self.codec_cfg),
            "access": dataclasses.asdict(access or AccessConfig()), "run": dict(run_config or {})}
        genesis = params_digest(self.buffers.global_params)
        self.manifest = RunManifest.from_dict({**base, "fingerprint": fingerprint(model), "genesis": genesis})
        outer_opt = build_outer_optimizer(self.buffers.global_params, self.outer_cfg)  # the simulator's rule too
        self.codec = get_codec(self.codec_cfg)
        self.error_feedback = error_feedback_for(self.codec_cfg, self.codec)
        self.transport = swarm.transport_for(self.manifest, templates=self.buffers.global_params, codec=self.codec,
                                             clip_factor=self.outer_cfg.clip_factor)
        self.phase = InnerPhase(self.steps_per_round, self.outer_cfg.target_samples)
        self.membership = Membership(self.manifest, self.transport, self.identity, cfg, self.board)
        self.tracker = ProgressTracker(self.transport, self.manifest.progress_key, cfg.heartbeat_ttl, self.identity,
                                       admits=self.membership.admits, heartbeat_period=cfg.heartbeat_period)
        step = lambda: self.state.outer_step  # noqa: E731 - read when asked: the step moves
        self.sync = Synchronizer(self.transport, self.tracker, cfg, heartbeat=lambda: self.heartbeats.progress(),
                                 stop=self.stop, refused=lambda peer_id: self.membership.refused(peer_id, step()),
                                 behind=lambda peers, mates_only: self.rounds.behind_check(peers, mates_only))
        self.catchup = CatchUp(
            manifest=self.manifest.hash, transport=self.transport, cfg=cfg,
            snapshot=lambda: self.state.chain_snapshot(), counts=lambda key: self.membership.counts(key, step()),
            fetch=lambda: self.sync.live(self.tracker.fetch()),
            blame=lambda peer_id, why: self.membership.exclude(peer_id, step(), why),
            templates=self.buffers.global_params, download_sources=cfg.download_sources, stop=self._halt)
        self.state = PeerState(buffers=self.buffers, outer_opt=outer_opt, inner_optimizer=self.inner_optimizer,
                               error_feedback=self.error_feedback, manifest=self.manifest, identity=self.identity,
                               transport=self.transport, board=self.board, phase=self.phase, catchup=self.catchup,
                               checkpoint=checkpoint or CheckpointConfig())
        self.heartbeats = Heartbeats(peer=self.state, phase=self.phase, tracker=self.tracker, sync=self.sync,
                                     membership=self.membership, catchup=self.catchup, board=self.board, cfg=cfg,
                                     target_samples=self.outer_cfg.target_samples, halt=self._halt, stop=self.stop)
        self.catchup.paused = lambda: self.heartbeats.state == "averaging"
        self.rounds = Rounds(buffers=self.buffers, peer=self.state, phase=self.phase, heartbeats=self.heartbeats,
                             sync=self.sync, membership=self.membership, catchup=self.catchup, board=self.board,
                             codec=self.codec, outer=self.outer_cfg, swarm=cfg, parts=self.parts, stop=self.stop,
                             evaluate=evaluate)
        tau = self.outer_cfg.delay_steps(inner_steps)
        self.flight = InFlight(self.rounds, tau, land_early=self.overlapped and not self.outer_cfg.overlap_steps)
        self._started = self._closed = False
        self.transport.set_state_provider(self.state.serve)
        self.board.update(
            peer_id=self.transport.peer_id, run_id=self.manifest.run_id, manifest_hash=self.manifest.hash,
            device=str(self.buffers.device), inner_steps_per_round=self.steps_per_round, outer_step=0,
            inner_step=0, num_params=sum(p.numel() for p in self.buffers.global_params), codec=self.codec.info.name)

    # ----- what a user reads --------------------------------------------------------------------------
    global_params = property(lambda self: self.buffers.global_params)
    outer_opt = property(lambda self: self.state.outer_opt)
    outer_step = property(lambda self: self.state.outer_step, doc="Committed (or adopted) outer steps.")
    digest = property(lambda self: self.state.digest, doc="The global parameters' digest.")
    chain = property(lambda self: self.state.chain, doc="The certificates of this peer's lineage.")
    inner_step = property(lambda self: self.phase.inner_step, doc="Inner steps of this peer's schedule.")
    initial_eval_loss = property(lambda self: self.rounds.initial_eval_loss)

    @property
    def in_flight(self) -> int | None:
        """The outer step of the newest round running behind the inner steps (``outer.overlap``), None if none."""
        return self.flight.newest_step

    @property
    def round_due(self) -> bool:
        """Whether the next :meth:`step` would start a round (or adopt a prepared lineage)."""
        return self.catchup.pending is not None or self.phase.due(counting_next=True)

    def round_parts(self) -> tuple[int, ...]:
        """The parameters the round of the current outer step syncs: all, or its streaming fragment's."""
        return self.parts[round_fragment(self.state.outer_step, len(self.parts))]

    # ----- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> DiLoCo:
        """Resume (if asked), check manifest and access (ManifestMismatch, AccessRefused), announce this peer,
        adopt the swarm's state if its lineage outweighs ours, start the heartbeat and catch-up threads."""
        if self._started:
            return self
        self.state.push_lineage(0)
        if self.resume:
            self.state.maybe_resume()
        self.membership.announce(wait_s=min(10.0, self.swarm.config.ready_timeout))  # refused: nothing to undo
        self._started = True
        self.heartbeats.publish()
        self.heartbeats.start()
        if self.catchup.check(self.sync.live(self.tracker.fetch())) is not None:  # a late joiner, an old restart
            taken = self.catchup.take(self.state.chain_snapshot())
            if taken is not None:
                self.state.adopt(taken)
        self.catchup.start()
        loss = self.rounds.initial_eval_loss = self.rounds.evaluate()
        self.board.update(eval_loss=loss, initial_eval_loss=loss)
        self.heartbeats.set_state("training")
        self.phase.started = self.phase.last_landed = time.perf_counter()
        self.heartbeats.publish()
        return self

    def close(self) -> None:
        """Leave the swarm: a last heartbeat saying so, the final checkpoint, the averager stopped."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flight.land_quietly()  # the rounds in flight land first: the checkpoint then holds them
        finally:
            self._halt.set()
        try:
            if self._started:
                self.heartbeats.set_state("stopped")
                self.heartbeats.publish()
                self.state.write_checkpoint()
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
        self.phase.count(samples, loss)
        report = None
        self.flight.stepped()
        while self.flight.oldest_due():
            report = self.flight.land()
        if self.stop.is_set():
            return report
        if self.catchup.pending is not None:  # adopted once no round is in flight (at the latest when one is due)
            if self.flight and self.phase.due():
                report = self.flight.land_all()
            if not self.flight:
                return report or self._adopt_pending()
        if self.phase.due():
            if self.overlapped:
                return self.flight.launch() or report  # runs behind the next inner steps; reported when it lands
            return self.sync_now()
        return report

    def attach(self, optimizer: torch.optim.Optimizer | None = None, samples: int = 1):
        """Call :meth:`step` after every ``optimizer.step()`` (default: the inner optimizer), torchft-style, so
        an existing loop runs unchanged. Returns the hook's handle (``handle.remove()`` detaches it); the round
        reports go to the status board (``diloco.board``), the loop's losses are not seen."""
        return (optimizer or self.inner_optimizer).register_step_post_hook(
            lambda _opt, _args, _kwargs: self.step(samples=samples))

    def sync_now(self) -> RoundReport:
        """Run the outer round now on the inner steps since the last and wait for it (rounds in flight land first)."""
        if not self._started:
            self.start()
        if self.overlapped:
            self.flight.land_all()
            report = self.flight.launch()
            return self.flight.land_all() or report
        report = self.rounds.run(self.rounds.inner_result(), self.round_parts())
        self._next_phase()
        return report

    def wait_for_round(self) -> RoundReport | None:
        """Land the rounds in flight, waiting if need be (a loop that stops calls it last); the last report or None."""
        return self.flight.land_all()

    def _next_phase(self) -> None:
        self.phase.restart()
        if not self.stop.is_set():
            self.heartbeats.set_state("training")
            self.heartbeats.publish()

    def _adopt_pending(self) -> RoundReport | None:
        taken = self.catchup.take(self.state.chain_snapshot())
        if taken is None:  # stale: prepared while this peer caught up by another adoption or a round
            return None
        report = self.rounds.adopt(None, self.rounds.inner_result(), self.phase.started, taken=taken)
        self._next_phase()
        return report

    # ----- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The global (agreed) state, this peer's inner optimizer state and its lineage: what a checkpoint
        holds (the model's entries are the global parameters; the model itself is not touched)."""
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt a :meth:`state_dict` (a checkpoint): the model restarts from its global parameters."""
        self.state.load(state)


__all__ = ["DiLoCo", "RoundReport", "fingerprint"]
