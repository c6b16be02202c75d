"""A peer alone with a lossy codec takes the step a group of one would: the decoded payload, and its error
feedback keeps the rest (for SparseLoCo, the whole accumulator is not applied again every lone round; for
rotate and hadtopk, in the model, as the simulator does)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from swarmloco.compression import get_codec
from swarmloco.app.peer import Peer, PeerOptions
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


@pytest.mark.parametrize("codec", [{"name": "rotate", "rotate_chunk": 64, "rotate_basis": "hadamard"},
                                   {"name": "rotate", "rotate_chunk": 64, "rotate_basis": "coords"},
                                   {"name": "hadtopk", "hadtopk_chunk": 64, "hadtopk_fraction": 0.1}],
                         ids=["rotate-hadamard", "rotate-coords", "hadtopk"])
def test_a_lone_peer_keeps_its_unsent_rest_in_the_model_as_the_simulator_does(tmp_path, codec) -> None:
    """The rotate and hadtopk codecs: a peer alone sends its round's share of each chunk at 1 bit and keeps the
    rest in its parameters (new global params minus the rest), ending 5 rounds (rotate: every phase, and one
    more) with the simulator's global parameters bit for bit; its checkpoint restores the model with the rest
    in it."""
    from swarmloco.sim.simulate import codec_transform, run_diloco

    torch.set_num_threads(1)
    rounds = 5
    cfg = tiny_config(codec=codec, inner={"steps": 4},
                      checkpoint={"dir": str(tmp_path), "every": 1})
    peer = Peer(cfg, LoneSwarm(), PeerOptions(device="cpu", max_outer_steps=rounds, shard=0))
    assert peer.run() == rounds
    sim = run_diloco(peer.corpus, cfg.model, cfg.inner, cfg.outer, workers=1, steps=rounds * cfg.inner.steps,
                     H=cfg.inner.steps, seed=cfg.seed, keep_model=True, keep_locals=True,
                     transform=codec_transform(cfg.codec, 1))
    ef = peer.diloco.error_feedback
    assert ef.in_model and ef.residual_norm() > 0
    for i, ((name, want), got, local, mine) in enumerate(zip(sim["model"].named_parameters(), peer.diloco.global_params,
                                                            sim["locals"][0].parameters(), peer.model.parameters())):
        assert torch.equal(got, want.detach()), f"{name} differs by {(got - want).abs().max().item()}"
        assert torch.equal(mine.detach(), local.detach()), f"{name}: the model is not the simulator's worker"
        assert torch.equal(mine.detach(), got - ef.rest(i)), f"{name}: the model is not global - rest"
    # resuming from the checkpoint puts the rest back into the model
    again = Peer(cfg, LoneSwarm(), PeerOptions(device="cpu", max_outer_steps=rounds, shard=0, resume=True))
    again.diloco.state.maybe_resume()
    assert again.diloco.outer_step == rounds
    for mine, restored in zip(peer.model.parameters(), again.model.parameters()):
        assert torch.equal(mine.detach(), restored.detach())


@pytest.mark.parametrize("name", ["rotate", "hadtopk"])
@pytest.mark.parametrize("outer", [{"overlap": "delayed"}, {"fragments": 2}])
def test_the_engine_refuses_a_rest_in_model_codec_with_rounds_that_land_behind_or_by_fragment(outer, name) -> None:
    """The rest kept in the model needs blocking rounds of the whole model: the library says so in one line
    (a ConfigError naming the field) before it touches the swarm."""
    from swarmloco import DiLoCo
    from swarmloco.config import CodecConfig, ConfigError, OuterConfig

    model = torch.nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="outer.(overlap|fragments)"):
        DiLoCo(LoneSwarm(), model, torch.optim.AdamW(model.parameters()), inner_steps=4,
               outer=OuterConfig(**outer), codec=CodecConfig(name=name))


def test_the_api_without_outer_settings_takes_the_outer_step_the_codec_was_tuned_with() -> None:
    from swarmloco import DiLoCo
    from swarmloco.config import CodecConfig, OuterConfig

    model = torch.nn.Linear(4, 4)
    for codec, expected in ((CodecConfig(name="hadtopk"), (1.6, 0.6)), (CodecConfig(name="int8"), (1.0, 0.7))):
        with DiLoCo(LoneSwarm(), model, torch.optim.AdamW(model.parameters()), inner_steps=4, codec=codec) as d:
            assert (d.outer_cfg.lr, d.outer_cfg.momentum) == expected
            assert (d.outer_opt.param_groups[0]["lr"], d.outer_opt.param_groups[0]["momentum"]) == expected
    mine = OuterConfig(lr=0.5, momentum=0.9)  # given settings are never replaced
    with DiLoCo(LoneSwarm(), model, torch.optim.AdamW(model.parameters()), inner_steps=4, outer=mine,
                codec=CodecConfig(name="hadtopk")) as d:
        assert d.outer_cfg is mine
