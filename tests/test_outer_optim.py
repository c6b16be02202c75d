"""The outer step is exactly torch's Nesterov SGD on the pseudo-gradient; lr=1, momentum=0 is averaging."""

import copy

import pytest
import torch

from swarmloco.config import OuterConfig
from swarmloco.outer_optim import OuterNesterov, apply_outer_step, build_outer_optimizer


def _params(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=gen), torch.randn(11, generator=gen)]


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_step_equals_torch_sgd_exactly(nesterov: bool) -> None:
    ours = [p.clone() for p in _params(0)]
    ref = [torch.nn.Parameter(p.clone()) for p in _params(0)]
    opt = OuterNesterov(ours, lr=0.7, momentum=0.9, nesterov=nesterov)
    ref_opt = torch.optim.SGD(ref, lr=0.7, momentum=0.9, nesterov=nesterov, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        apply_outer_step(opt, ours, grads)
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        ref_opt.step()
        for a, b in zip(ours, ref):
            assert torch.equal(a, b.detach()), "outer step deviates from torch.optim.SGD"


def test_plain_averaging_equals_mean_of_peer_params() -> None:
    global_params = _params(0)
    locals_ = [[p + torch.randn(p.shape) for p in global_params] for _ in range(4)]
    pseudo = [torch.stack([g - loc[i] for loc in locals_]).mean(0) for i, g in enumerate(global_params)]
    params = [p.clone() for p in global_params]
    opt = OuterNesterov(params, lr=1.0, momentum=0.0, nesterov=False)
    apply_outer_step(opt, params, pseudo)
    for i, p in enumerate(params):
        mean = torch.stack([loc[i] for loc in locals_]).mean(0)
        torch.testing.assert_close(p, mean, rtol=0, atol=1e-6)


def test_outer_state_round_trips_through_state_dict() -> None:
    a = _params(0)
    opt = OuterNesterov(a, lr=0.5, momentum=0.9)
    apply_outer_step(opt, a, [torch.ones_like(p) for p in a])
    b = [p.clone() for p in a]
    opt_b = OuterNesterov(b, lr=0.5, momentum=0.9)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read from disk
    g = [torch.full_like(p, 0.3) for p in a]
    apply_outer_step(opt, a, g)
    apply_outer_step(opt_b, b, g)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kwargs", [dict(lr=0), dict(momentum=1.0), dict(momentum=0.0, nesterov=True)])
def test_bad_outer_hyperparameters_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        OuterNesterov(_params(0), **kwargs)


def test_the_outer_step_defaults_are_the_runs() -> None:
    """A bare OuterNesterov steps as a run that sets nothing in [outer]: one source for lr and momentum."""
    defaults = build_outer_optimizer(_params(0), OuterConfig()).defaults
    assert OuterNesterov(_params(0)).defaults == defaults == dict(lr=1.0, momentum=0.7, nesterov=True)


@pytest.mark.parametrize("cfg", [OuterConfig(), OuterConfig(lr=0.7, momentum=0.9),
                                 OuterConfig(lr=0.8, momentum=0.5, nesterov=False),
                                 OuterConfig(lr=1.0, momentum=0.0, nesterov=False)], ids=str)
def test_the_config_builds_torch_sgd_with_its_settings(cfg) -> None:
    """build_outer_optimizer is the one constructor of the outer step (the peer's and the simulator's):
    with any [outer] setting it steps exactly like torch.optim.SGD with those settings."""
    ours = [p.clone() for p in _params(2)]
    ref = [torch.nn.Parameter(p.clone()) for p in _params(2)]
    opt = build_outer_optimizer(ours, cfg)
    ref_opt = torch.optim.SGD(ref, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        apply_outer_step(opt, ours, grads)
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        ref_opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(ours, ref))
