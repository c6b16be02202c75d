"""The public API: the user's own model, optimizer and loop, through ``swarmloco.Swarm`` and ``swarmloco.DiLoCo``.

In-process tests run a peer alone (its rounds never touch the network); the multi-process ones run
``examples/own_model.py`` as a user would, several times on loopback.
"""

from __future__ import annotations

import functools
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import swarmloco
from test_cuda import LoneSwarm
from swarmloco.protocol.processes import signal_session

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_model.py"


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def train(diloco, model, steps: int, opt=None, scaler=None, accumulate: int = 1) -> list:
    opt = opt or diloco.inner_optimizer
    g = torch.Generator().manual_seed(1)
    reports = []
    for i in range(steps * accumulate):
        x = torch.randn(4, 8, generator=g)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean() / accumulate
        (scaler.scale(loss) if scaler else loss).backward()
        if (i + 1) % accumulate:
            continue  # gradient accumulation: the optimizer (and DiLoCo) step every `accumulate` batches
        scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
        opt.zero_grad()
        report = diloco.step(samples=4 * accumulate, loss=loss)
        if report is not None:
            reports.append(report)
    return reports


def test_any_module_and_optimizer_factory_run_an_outer_round_every_inner_steps_calls() -> None:
    model = mlp()
    with swarmloco.DiLoCo(LoneSwarm(), model, functools.partial(torch.optim.SGD, lr=0.05), inner_steps=5) as diloco:
        before = [g.clone() for g in diloco.global_params]
        reports = train(diloco, model, 12)
        assert [r.outer_step for r in reports] == [1, 2] and all(r.ok and r.peers == 1 for r in reports)
        assert all(r.train_loss == r.train_loss for r in reports)  # the mean of the losses passed to step()
        assert any(not torch.equal(a, b) for a, b in zip(before, diloco.global_params))
        assert isinstance(diloco.inner_optimizer, torch.optim.SGD)


def test_attach_runs_the_outer_rounds_from_an_unchanged_loop_as_explicit_steps_do() -> None:
    """``diloco.attach()``: a post-step hook on the inner optimizer, so the user's loop calls only opt.step();
    the rounds and the global parameters are the same as with diloco.step() after every opt.step()."""
    def run(attached: bool) -> tuple[list, list[torch.Tensor]]:
        model = mlp()
        diloco = swarmloco.DiLoCo(LoneSwarm(), model, functools.partial(torch.optim.AdamW, lr=1e-2), inner_steps=3)
        opt, g, steps = diloco.inner_optimizer, torch.Generator().manual_seed(1), []
        handle = diloco.attach(samples=4) if attached else None
        for _ in range(7):
            x = torch.randn(4, 8, generator=g)
            (model(x) - x.sum(1, keepdim=True)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if not attached:
                diloco.step(samples=4)
            steps.append(diloco.outer_step)
        if handle is not None:
            handle.remove()
            opt.step()  # detached: no more inner steps are counted
            assert diloco.inner_step == 7
        result = (steps, [p.clone() for p in diloco.global_params])
        diloco.close()
        return result

    (steps, params), (hooked_steps, hooked_params) = run(attached=False), run(attached=True)
    assert hooked_steps == steps == [0, 0, 1, 1, 1, 2, 2]
    assert all(torch.equal(a, b) for a, b in zip(params, hooked_params))


def test_state_dict_leaves_the_model_alone_and_load_state_dict_resumes() -> None:
    model = mlp()
    diloco = swarmloco.DiLoCo(LoneSwarm(), model, functools.partial(torch.optim.AdamW, lr=1e-2), inner_steps=3)
    train(diloco, model, 4)  # one round, then one inner step of the next
    local = [p.detach().clone() for p in model.parameters()]
    state = diloco.state_dict()
    assert all(torch.equal(a, p) for a, p in zip(local, model.parameters()))  # inner progress untouched
    assert state["outer_step"] == 1 and state["lineage"]["certs"]
    assert all(torch.equal(state["model"][k], g) for k, g in zip(dict(model.named_parameters()), diloco.global_params))
    diloco.close()

    again_model = mlp()
    again = swarmloco.DiLoCo(LoneSwarm(), again_model, functools.partial(torch.optim.AdamW, lr=1e-2), inner_steps=3)
    again.load_state_dict(state)
    assert again.outer_step == 1 and again.chain.tip_digest == diloco.chain.tip_digest
    assert all(torch.equal(a, b) for a, b in zip(again.global_params, diloco.global_params))
    again.close()


def test_amp_grad_scaler_and_gradient_accumulation_work_with_the_users_optimizer() -> None:
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # an optimizer already built is taken as it is
    scaler = torch.amp.GradScaler("cpu")
    with swarmloco.DiLoCo(LoneSwarm(), model, opt, inner_steps=4) as diloco:
        assert diloco.inner_optimizer is opt
        reports = train(diloco, model, 8, scaler=scaler, accumulate=3)
        assert [r.outer_step for r in reports] == [1, 2] and all(r.ok for r in reports)


def test_the_manifest_knows_the_model_and_names_the_first_differing_parameter() -> None:
    from swarmloco.protocol.manifest import ManifestMismatch, check_against_swarm

    a = swarmloco.DiLoCo(LoneSwarm(), mlp(), functools.partial(torch.optim.SGD, lr=0.1), inner_steps=5)
    wider = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    b = swarmloco.DiLoCo(LoneSwarm(), wider, functools.partial(torch.optim.SGD, lr=0.1), inner_steps=5)
    with pytest.raises(ManifestMismatch, match=r"parameter 0.weight is 32x8:float32 here, 16x8:float32 in the swarm"):
        check_against_swarm(b.manifest, [a.manifest])
    reseeded = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))  # seed not set
    c = swarmloco.DiLoCo(LoneSwarm(), reseeded, functools.partial(torch.optim.SGD, lr=0.1), inner_steps=5)
    with pytest.raises(ManifestMismatch, match="initial parameters"):
        check_against_swarm(c.manifest, [a.manifest])
    for d in (a, b, c):
        d.close()


# ----- several processes running the example -------------------------------------------------------
class Example:
    """``examples/own_model.py`` in its own session; its stdout lines in a queue."""

    def __init__(self, tmp: Path, name: str, *args: str, env: dict | None = None):
        self.name, self.log = name, open(tmp / f"{name}.log", "a")
        self.proc = subprocess.Popen([sys.executable, str(EXAMPLE), *args], stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})})
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout] + [self.lines.put(None)],
                         daemon=True).start()

    def expect(self, pattern: str, timeout: float = 120.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.proc.wait()}) after {self.seen[-6:]}: "
                                   f"{Path(self.log.name).read_text()[-2000:]}")
            self.seen.append(line.strip())
            m = re.search(pattern, line)
            if m:
                return m
        raise TimeoutError(f"{self.name}: no line matching {pattern!r} in {timeout}s")

    def rounds(self, n: int, adopted: bool = False) -> dict[int, str]:
        """Digests of the next ``n`` committed rounds (``adopted``: also of rounds this peer failed and took the
        others' certified state for)."""
        out = {}
        self.adopted: set[int] = set()
        while len(out) < n:
            m = self.expect(r"round (\d+) ok=True adopted=(True|False) peers=(\d+) .* digest=(\w+)")
            if m.group(2) == "True":
                if not adopted:
                    continue
                self.adopted.add(int(m.group(1)))
            out[int(m.group(1))] = m.group(4)
        return out

    def kill(self) -> None:
        signal_session(self.proc.pid, signal.SIGKILL)  # (hivemind's helpers lead process groups of their own)
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def example(tmp_path):
    started = []

    def start(name, *args, env=None):
        started.append(Example(tmp_path, name, *args, env=env))
        return started[-1]

    yield start
    for e in started:
        e.kill()


@pytest.mark.slow
def test_several_processes_train_a_custom_model_through_the_api_bit_identically(example) -> None:
    first = example("a", "--min-peers", "3", "--rounds", "5")
    addr = first.expect(r"address: (\S+)").group(1)
    others = [example(n, "--initial-peers", addr, "--seed", str(i), "--rounds", "5", "--min-peers", "3")
              for i, n in ((1, "b"), (2, "c"))]
    peers = [first, *others]
    # (on a loaded machine matchmaking can leave one member out of a round: it takes the others' certified
    # state, so its digest is theirs; it is no longer counted as averaged for that step)
    got = [p.rounds(5, adopted=True) for p in peers]
    for step in range(1, 5):  # (the last round races the others' exits: a peer left alone may end it alone)
        assert len({g[step] for g in got}) == 1, (step, got)  # every round ends bit-identical everywhere
        assert sum(step not in p.adopted for p in peers) >= 2, (step, got)  # ... averaged by most of them


@pytest.mark.slow
def test_a_peer_killed_mid_round_and_a_late_joiner_under_the_api(example) -> None:
    wide = ("--hidden", "2048", "--rounds", "1000", "--min-peers", "3")  # every peer reduces a part of it
    first = example("a", *wide)
    addr = first.expect(r"address: (\S+)").group(1)
    mate = example("b", "--initial-peers", addr, "--seed", "1", *wide)
    victim = example("c", "--initial-peers", addr, "--seed", "2", *wide, env={"SWARMLOCO_FAULT": "stall_allreduce:1"})
    victim.expect(r"\"kind\": \"fault\"")  # a reducer in the middle of an all-reduce, hanging: kill it there
    victim.kill()
    after = [p.rounds(2) for p in (first, mate)]
    common = set(after[0]) & set(after[1])
    assert common and all(after[0][s] == after[1][s] for s in common), after  # the survivors agree
    late = example("d", "--initial-peers", addr, "--seed", "3", *wide)
    m = late.expect(r"round (\d+) ok=True adopted=False peers=3 .* digest=(\w+)", timeout=180)
    step, digest = int(m.group(1)), m.group(2)
    for p in (first, mate):  # the joiner downloaded their state and averages in step with them
        assert p.expect(rf"round {step} ok=True .* digest=(\w+)", timeout=120).group(1) == digest


@pytest.mark.slow
def test_a_peer_with_a_different_model_is_refused_in_one_line(example) -> None:
    first = example("a", "--rounds", "100000")  # it trains alone until the test ends
    addr = first.expect(r"address: (\S+)").group(1)
    first.rounds(1)
    odd = example("b", "--initial-peers", addr, "--hidden", "32")
    assert odd.proc.wait(120) == 1
    err = Path(odd.log.name).read_text().strip().splitlines()
    assert err[-1].startswith("refused: ") and "parameter 0.weight is 32x16:float32 here, 64x16:float32" in err[-1]
