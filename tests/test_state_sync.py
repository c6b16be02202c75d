"""The checks on a downloaded state (pure logic, no network)."""

from __future__ import annotations

import pytest
import torch

from swarmloco.node.state_sync import StateError, pack_state, params_digest, unpack_state

MANIFEST = "m" * 64


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


def test_a_state_older_than_its_proven_lineage_is_rejected() -> None:
    params, meta, tensors = _state(step=4)
    with pytest.raises(StateError, match="older"):
        unpack_state(meta, tensors, manifest_hash=MANIFEST, templates=params, min_step=5)
