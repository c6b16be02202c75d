"""The lineage rule and the checks on a downloaded state (pure logic, no network)."""

from __future__ import annotations

import time

import pytest
import torch

from swarmloco.node.state_sync import StateError, Target, choose_target, pack_state, params_digest, unpack_state
from swarmloco.protocol.progress import PeerProgress

MANIFEST = "m" * 64


def peer(pid: str, step: int, digest: str, state: str = "training") -> PeerProgress:
    return PeerProgress(peer_id=pid, outer_step=step, state=state, time=time.time(), digest=digest)


def test_peer_on_the_swarms_lineage_stays() -> None:
    assert choose_target([peer("a", 3, "d"), peer("b", 3, "d")], "me", 3, "d") is None


def test_peer_behind_adopts_the_highest_step_from_its_holders() -> None:
    target = choose_target([peer("a", 5, "x"), peer("b", 5, "x", "averaging"), peer("c", 4, "y")], "me", 4, "y")
    assert target == Target(5, "x", ("a", "b"))  # idle/training sources before busy ones


def test_split_at_the_same_step_resolves_to_the_majority() -> None:
    peers = [peer("a", 3, "x"), peer("b", 3, "x"), peer("d", 3, "x"), peer("c", 3, "y")]
    assert choose_target(peers, "me", 3, "y").digest == "x"
    assert choose_target(peers, "me", 3, "x") is None


def test_an_even_split_resolves_the_same_way_on_both_sides() -> None:
    left = choose_target([peer("b", 3, "bbbb")], "a", 3, "aaaa")
    right = choose_target([peer("a", 3, "aaaa")], "b", 3, "bbbb")
    assert (left is None) != (right is None)  # exactly one side moves


def test_joining_and_digestless_peers_are_not_sources() -> None:
    assert choose_target([peer("a", 9, "x", "joining"), peer("b", 9, "")], "me", 0, "init") is None


def test_ignored_peers_are_not_followed() -> None:
    assert choose_target([peer("dead", 9, "x")], "me", 2, "y", ignore={"dead"}) is None


def _state(step: int = 4):
    params = [torch.randn(3, 4), torch.randn(5)]
    momentum = [torch.randn(3, 4), torch.randn(5)]
    meta, tensors = pack_state(params, momentum, step, MANIFEST, params_digest(params))
    return params, meta, tensors


def test_a_packed_state_round_trips() -> None:
    params, meta, tensors = _state()
    got = unpack_state(meta, tensors, manifest_hash=MANIFEST, templates=params)
    assert got.outer_step == 4 and got.momentum is not None
    assert all(torch.equal(a, b) for a, b in zip(got.params, params))


def test_no_momentum_yet_is_sent_as_zeros_and_adopted_as_none() -> None:
    params = [torch.randn(2, 2)]
    meta, tensors = pack_state(params, [None], 0, MANIFEST, params_digest(params))
    assert unpack_state(meta, tensors, manifest_hash=MANIFEST, templates=params).momentum is None


@pytest.mark.parametrize("tamper, message", [
    (lambda m, t: (None, t), "malformed"),
    (lambda m, t: ({**m, "manifest_hash": "z" * 64}, t), "belongs to manifest"),
    (lambda m, t: ({**m, "outer_step": -1}, t), "valid outer_step"),
    (lambda m, t: (m, t[:-1]), "tensors"),
    (lambda m, t: (m, [t[0].double(), *t[1:]]), "expected"),
    (lambda m, t: (m, [t[0][:2], *t[1:]]), "expected"),
    (lambda m, t: (m, [torch.full_like(t[0], float("nan")), *t[1:]]), "NaN/Inf"),
    (lambda m, t: (m, [t[0] + 1e-3, *t[1:]]), "does not match"),
    (lambda m, t: ({**m, "v": 99}, t), "version"),
])
def test_a_tampered_state_is_rejected_with_a_reason(tamper, message) -> None:
    params, meta, tensors = _state()
    bad_meta, bad_tensors = tamper(meta, list(tensors))
    with pytest.raises(StateError, match=message):
        unpack_state(bad_meta, bad_tensors, manifest_hash=MANIFEST, templates=params)


def test_a_state_older_or_other_than_the_target_is_rejected() -> None:
    params, meta, tensors = _state(step=4)
    with pytest.raises(StateError, match="older"):
        unpack_state(meta, tensors, manifest_hash=MANIFEST, templates=params, target=Target(5, "x", ("a",)))
    with pytest.raises(StateError, match="the swarm's is"):
        unpack_state(meta, tensors, manifest_hash=MANIFEST, templates=params, target=Target(4, "f" * 16, ("a",)))
