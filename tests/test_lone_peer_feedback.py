"""A peer alone with a lossy codec takes the step a group of one would: the decoded payload, and its error
feedback keeps the rest (for SparseLoCo, the whole accumulator is not applied again every lone round)."""

from __future__ import annotations

import torch

from conftest import tiny_config
from swarmloco.compression import get_codec
from swarmloco.node.peer import Peer, PeerOptions
from swarmloco.protocol.identity import Identity


class LoneTransport:
    """Just enough of a Transport for a peer alone (rounds of one never touch the network)."""

    def __init__(self):
        self.identity = Identity.generate()
        self.peer_id = self.identity.libp2p_peer_id()
        self.records: dict[str, dict[str, bytes]] = {}

    def visible_maddrs(self):
        return []

    def store(self, key, subkey, value, expiration_time):
        self.records.setdefault(key, {})[subkey] = value
        return True

    def get(self, key):
        return dict(self.records.get(key, {}))

    def set_state_provider(self, provider):
        self.provider = provider

    def set_gate(self, private, admitted, excluded):
        pass

    def start_round(self, *args, **kwargs):
        raise AssertionError("a lone peer must not start a network round")

    def download_state(self, *args, **kwargs):
        return None, ["no peers"]

    def shutdown(self):
        pass


def test_a_lone_sparseloco_peer_applies_its_sparse_payload_and_keeps_the_rest() -> None:
    torch.set_num_threads(1)
    cfg = tiny_config(codec={"name": "topk", "topk_chunk": 64}, outer={"lr": 4.0, "momentum": 0.0, "nesterov": False},
                      inner={"steps": 4})
    transport = LoneTransport()
    peer = Peer(cfg, transport, PeerOptions(device="cpu", max_outer_steps=1), identity=transport.identity)
    before = [g.clone() for g in peer.global_params]
    assert peer.run() == 1
    codec = get_codec(cfg.codec)
    for i, (b, g) in enumerate(zip(before, peer.global_params)):
        sent = (b - g) / cfg.outer.lr  # theta_1 = theta_0 - lr * C(e)
        chunks = -(-g.numel() // 64)
        assert int(sent.count_nonzero()) <= chunks * codec.keep(64), "a lone peer applied more than its payload"
        residual = peer.error_feedback.residuals[i]
        # e = delta (first round) = C(e) + residual: the payload decodes to what was applied
        torch.testing.assert_close(codec.roundtrip(residual + sent), sent, rtol=1e-4, atol=1e-7)
    assert peer.error_feedback.residual_norm() > 0
