"""The CUDA path of a peer (skipped without a GPU): bf16 autocast inner steps, pinned staging, outer step.

CI has no GPU; these run on a lent GPU machine (see BENCHMARKS.md, "CUDA path").
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from swarmloco.config import RunConfig
from swarmloco.app.peer import Peer, PeerOptions
from swarmloco.protocol.identity import Identity

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from conftest import tiny_config  # noqa: E402


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

    def set_lineage(self, root_step, root_digest, start, entries):
        self.lineage = (root_step, root_digest, start, list(entries))

    def fetch_lineage(self, *args, **kwargs):
        return None, "no peers"

    def dead(self):
        return None

    def shutdown(self):
        pass


class LoneSwarm:
    """Just enough of a :class:`swarmloco.Swarm` for a peer alone: its transport is a LoneTransport."""

    def __init__(self, run_id: str = "test"):
        self.transport = LoneTransport()
        self.identity, self.peer_id, self.run_id = self.transport.identity, self.transport.peer_id, run_id
        self.config = tiny_config().swarm
        self.stop = threading.Event()

    def transport_for(self, manifest, templates, codec, clip_factor):
        return self.transport


def lone_peer(cfg: RunConfig) -> Peer:
    return Peer(cfg, LoneSwarm(), PeerOptions(device="cuda", max_outer_steps=2))


def test_a_peer_trains_on_cuda_with_bf16_autocast_and_pinned_staging() -> None:
    peer = lone_peer(tiny_config())
    assert peer.device.type == "cuda" and peer.inner.autocast
    global_params = peer.diloco.global_params
    assert all(g.is_pinned() for g in global_params)  # H2D / D2H copies do not go through pageable memory
    before = [g.clone() for g in global_params]
    assert peer.run() == 2
    assert peer.outer_step == 2 and math.isfinite(peer.board.get("eval_loss"))
    assert any(not torch.equal(a, b) for a, b in zip(before, global_params))
    # the local model holds the global parameters after each outer step
    for p, g in zip(peer.model.parameters(), global_params):
        assert torch.equal(p.detach().cpu(), g)


def test_the_pseudo_gradient_from_the_gpu_equals_the_cpu_computation() -> None:
    peer = lone_peer(tiny_config())
    with torch.no_grad():
        for p in peer.model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    staged = peer.diloco.buffers.pseudo_gradient(range(len(peer.diloco.global_params)))
    expected = [g - p.detach().cpu().float() for g, p in zip(peer.diloco.global_params, peer.model.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(staged, expected))


@pytest.mark.parametrize("outer", [{"overlap": "eager", "overlap_steps": 2}, {"overlap": "delayed", "fragments": 2}],
                         ids=["eager", "delayed-fragments"])
def test_overlapped_rounds_run_on_cuda(outer) -> None:
    """Rounds behind training on the GPU: the landing's correction goes to the device from pinned buffers, the
    evaluation of the global parameters sets the peer's own aside on the device and puts them back."""
    peer = Peer(tiny_config(outer=outer, inner={"steps": 4}), LoneSwarm(), PeerOptions(device="cuda", max_outer_steps=3))
    before = [g.clone() for g in peer.diloco.global_params]
    assert peer.run() == 3 and peer.outer_step == 3
    assert math.isfinite(peer.board.get("eval_loss"))
    assert any(not torch.equal(a, b) for a, b in zip(before, peer.diloco.global_params))
    assert all(p.is_cuda and bool(torch.isfinite(p).all()) for p in peer.model.parameters())
