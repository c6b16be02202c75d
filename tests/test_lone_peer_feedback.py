"""A peer alone with a lossy codec takes the step a group of one would: the decoded payload, and its error
feedback keeps the rest (for SparseLoCo, the whole accumulator is not applied again every lone round)."""

from __future__ import annotations

import torch

from conftest import tiny_config
from swarmloco.compression import get_codec
from swarmloco.node.peer import Peer, PeerOptions
from test_cuda import LoneSwarm


def test_a_lone_sparseloco_peer_applies_its_sparse_payload_and_keeps_the_rest() -> None:
    torch.set_num_threads(1)
    cfg = tiny_config(codec={"name": "topk", "topk_chunk": 64}, outer={"lr": 4.0, "momentum": 0.0, "nesterov": False},
                      inner={"steps": 4})
    peer = Peer(cfg, LoneSwarm(), PeerOptions(device="cpu", max_outer_steps=1))
    before = [g.clone() for g in peer.diloco.global_params]
    assert peer.run() == 1
    codec = get_codec(cfg.codec)
    for i, (b, g) in enumerate(zip(before, peer.diloco.global_params)):
        sent = (b - g) / cfg.outer.lr  # theta_1 = theta_0 - lr * C(e)
        assert int(sent.count_nonzero()) <= codec.kept(g.numel()), "a lone peer applied more than its payload"
        residual = peer.diloco.error_feedback.residuals[i]
        # e = delta (first round) = C(e) + residual: the payload decodes to what was applied
        torch.testing.assert_close(codec.roundtrip(residual + sent), sent, rtol=1e-4, atol=1e-7)
    assert peer.diloco.error_feedback.residual_norm() > 0
