"""The engine's overlapped and streaming rounds (swarmloco.node.overlapped) follow the simulator's rule, which
tests/test_simulate.py checks against a hand-written reference: a peer alone (its average is its own
pseudo-gradient) ends with the simulator's global parameters, bit for bit (with an explicit overlap_steps:
``overlap_steps = 0`` lands a round as soon as it ended, which depends on the machine's timing)."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import tiny_config
from swarmloco.app.peer import Peer, PeerOptions
from swarmloco.sim.simulate import run_diloco
from test_cuda import LoneSwarm


@pytest.mark.parametrize("outer", [
    {"overlap": "eager", "overlap_steps": 2},
    {"overlap": "delayed", "fragments": 2, "overlap_steps": 1, "overlap_alpha": 0.5},
    {"overlap": "eager", "fragments": 2, "overlap_steps": 2},
    {"fragments": 2},
    {"overlap": "delayed", "fragments": 4, "overlap_steps": 3},  # up to 3 rounds in flight
    {"overlap": "eager", "fragments": 2, "overlap_steps": 4, "overlap_alpha": 0.5},  # tau = H: 2 in flight
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


def test_a_round_that_fails_with_rounds_queued_behind_it_is_run_again_and_they_are_not_run() -> None:
    """Streaming with tau > H / F: several rounds in flight, their exchanges one after another. When one ends
    without a commit, the rounds started after it (for the steps after it) are not run, the next round to
    start is for its step again (its fragment), and training goes on: every step commits once, in order."""
    from swarmloco.protocol.interface import RoundOutcome

    torch.set_num_threads(1)
    real_exchange, failed, queued = None, [], threading.Event()

    def exchange(work):
        if work.step == 2 and not failed:  # the first try of outer step 2 fails, once step 3 started behind it
            failed.append(work.index)
            assert queued.wait(30), "the round of step 3 was not started while the one of step 2 ran"
            work.outcome = RoundOutcome(ok=False, error="injected")
            return
        real_exchange(work)

    cfg = tiny_config(inner={"steps": 4}, outer={"overlap": "delayed", "fragments": 4, "overlap_steps": 3})
    peer = Peer(cfg, LoneSwarm(), PeerOptions(device="cpu", max_outer_steps=6, shard=0))
    real_exchange, peer.diloco.rounds.exchange = peer.diloco.rounds.exchange, exchange
    flight = peer.diloco.flight
    launched = flight.launched
    flight.launched = lambda step: (launched(step), step == 3 and queued.set())
    history, board_round_done = [], peer.board.round_done
    peer.board.round_done = lambda summary: (history.append(summary), board_round_done(summary))
    assert peer.run() == 6
    # each round carries its own phase's samples (1 step of 8), not those of the rounds in flight before it
    assert [h["samples"] for h in history[:2]] == [8, 8], history[:2]
    assert [h["landed_after_steps"] for h in history[:2]] == [3, 3]  # exactly tau
    committed = [h["outer_step"] for h in history if h["ok"]]
    assert committed == list(range(1, 7)), history
    not_ok = [h for h in history if not h["ok"]]
    assert not_ok[0]["error"] == "injected" and not_ok[0]["outer_step"] == 2
    assert not_ok[1:] and all(h["error"].startswith("not run") for h in not_ok[1:]), not_ok
    # the re-run of step 2 synced the failed round's fragment, and the steps after it theirs
    assert [h["fragment"] for h in history if h["ok"]] == [s % 4 for s in range(6)]
    assert peer.diloco.parts[2] == failed[0]


def test_a_heavier_lineage_found_with_rounds_queued_behind_drops_them_and_adopts_once() -> None:
    """A round whose barrier finds a heavier lineage ends in that adoption when it lands: the rounds queued behind
    it are not run, dropped without a correction, and the adoption happens once; training goes on from there."""
    from swarmloco.node.round import RoundReport

    torch.set_num_threads(1)
    real_exchange, queued, adoptions = None, threading.Event(), []

    def exchange(work):
        if work.step == 2 and not adoptions:  # its barrier finds a heavier lineage, once step 3 started behind it
            assert queued.wait(30), "the round of step 3 was not started while the one of step 2 ran"
            work.behind = "a prepared lineage"
            return
        real_exchange(work)

    cfg = tiny_config(inner={"steps": 4}, outer={"overlap": "delayed", "fragments": 4, "overlap_steps": 3})
    peer = Peer(cfg, LoneSwarm(), PeerOptions(device="cpu", max_outer_steps=5, shard=0))
    diloco = peer.diloco
    real_exchange, diloco.rounds.exchange = diloco.rounds.exchange, exchange
    launched = diloco.flight.launched
    diloco.flight.launched = lambda step: (launched(step), step == 3 and queued.set())

    def adopt(pending, inner, t0, taken=None):  # (a stand-in: the state stays this peer's own)
        adoptions.append((pending, len(diloco.flight)))
        return RoundReport(outer_step=diloco.outer_step, ok=True, adopted=True, peers=1, train_loss=float("nan"),
                           eval_loss=float("nan"), round_time=0.0)

    diloco.rounds.adopt = adopt
    history, board_round_done = [], peer.board.round_done
    peer.board.round_done = lambda summary: (history.append(summary), board_round_done(summary))
    assert peer.run() == 5
    assert adoptions == [("a prepared lineage", 0)]  # once, after the queued rounds were dropped
    assert [h["outer_step"] for h in history if h["ok"]] == list(range(1, 6))  # step 2 (and on) run again
    assert not [h for h in history if not h["ok"]], "dropped rounds are not reported"
