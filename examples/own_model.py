"""Your own PyTorch model and loop in a swarm: an MLP (not a transformer), a plain training loop.

    python examples/own_model.py --min-peers 3                         # prints "address: /ip4/..."
    python examples/own_model.py --initial-peers /ip4/127.0.0.1/tcp/4242/p2p/12D3KooW... --seed 1   # x2

Every process builds the same model (same seed), trains on its own data and calls ``diloco.step()``
after each optimizer step; every ``--inner-steps`` steps the peers average and take the outer step.
"""

import argparse
import functools

import torch

import swarmloco


def make_model(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)  # every peer starts from the same weights (the swarm checks: its "genesis")
    return torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))


def batches(seed: int):
    """This peer's own data: a fixed teacher's outputs on random inputs drawn from its own seed."""
    w = torch.randn(16, 1, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(32, 16, generator=g)
        yield x, torch.sin(x @ w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--initial-peers", action="append", default=[])
    ap.add_argument("--min-peers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model = make_model(args.hidden)
    with swarmloco.Swarm("own-model", initial_peers=args.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                         min_peers=args.min_peers) as swarm:
        print("address:", swarm.visible_maddrs()[0], flush=True)
        diloco = swarmloco.DiLoCo(swarm, model, functools.partial(torch.optim.AdamW, lr=3e-3),
                                  inner_steps=args.inner_steps, run_config={"task": "sin-regression"})
        try:
            with diloco:
                opt = diloco.inner_optimizer
                for x, y in batches(args.seed):
                    loss = torch.nn.functional.mse_loss(model(x), y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    report = diloco.step(samples=len(x), loss=loss)
                    if report is not None:
                        print(f"round {report.outer_step} ok={report.ok} adopted={report.adopted} "
                              f"peers={report.peers} loss={report.train_loss:.4f} digest={diloco.digest[:16]}",
                              flush=True)
                        if report.outer_step >= args.rounds:
                            break
        except swarmloco.ManifestMismatch as e:
            raise SystemExit(f"refused: {e}") from None


if __name__ == "__main__":
    main()
