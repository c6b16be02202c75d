"""The engine's overlapped and streaming rounds (swarmloco.node.overlapped) follow the simulator's rule, which
tests/test_simulate.py checks against a hand-written reference: a peer alone (its average is its own
pseudo-gradient) ends with the simulator's global parameters, bit for bit (with an explicit overlap_steps:
``overlap_steps = 0`` lands a round as soon as it ended, which depends on the machine's timing)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from swarmloco.node.peer import Peer, PeerOptions
from swarmloco.node.simulate import run_diloco
from test_cuda import LoneSwarm


@pytest.mark.parametrize("outer", [
    {"overlap": "eager", "overlap_steps": 2},
    {"overlap": "delayed", "fragments": 2, "overlap_steps": 1, "overlap_alpha": 0.5},
    {"overlap": "eager", "fragments": 2, "overlap_steps": 2},
    {"fragments": 2},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_a_lone_peers_overlapped_rounds_equal_the_simulators(outer) -> None:
    torch.set_num_threads(1)
    rounds = 5
    cfg = tiny_config(inner={"steps": 4}, outer=outer)
    peer = Peer(cfg, LoneSwarm(), PeerOptions(device="cpu", max_outer_steps=rounds, shard=0))
    assert peer.run() == rounds
    phase = cfg.inner.steps // cfg.outer.fragments
    sim = run_diloco(peer.corpus, cfg.model, cfg.inner, cfg.outer, workers=1, steps=rounds * phase,
                     H=cfg.inner.steps, seed=cfg.seed, keep_model=True)
    assert sim["syncs"] == rounds
    for (name, want), got in zip(sim["model"].named_parameters(), peer.diloco.global_params):
        assert torch.equal(got, want.detach()), f"{name} differs by {(got - want).abs().max().item()}"
    history = peer.board.snapshot()["history"]
    assert [h["outer_step"] for h in history] == list(range(1, rounds + 1))
