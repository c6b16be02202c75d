"""A tiny LlamaForCausalLM from config, on a BPE tokenizer the peers train themselves, in a real CLI swarm."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from test_faults import FAST, assert_same_state

pytestmark = pytest.mark.slow

LLAMA = {"kind": "hf", "architecture": "LlamaForCausalLM", "block_size": 32,
         "config": {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}}
DATA = {"kind": "hf", "path": str(Path(sysconfig.get_paths()["stdlib"]) / "json"), "tokenizer_vocab_size": 512,
        "num_shards": 4, "batch_size": 4, "eval_batches": 2}


def test_a_tiny_llama_swarm_of_three_cli_peers_ends_every_round_bit_identical(spawn, write_config, tmp_path) -> None:
    config = write_config(model=LLAMA, data=DATA, swarm={**FAST, "min_peers": 3})
    env = {"SWARMLOCO_CACHE": str(tmp_path / "cache")}  # one machine: the tokenizer is trained once
    first = spawn("p0", config, "--shard", "0", env=env)
    peers = [first] + [spawn(f"p{i}", config, "--shard", str(i), initial_peers=first.maddrs(), env=env) for i in (1, 2)]
    for _ in range(3):
        rounds = [p.next_round(timeout=240) for p in peers]
        assert_same_state(*rounds)
        # (one member may adopt the step instead: on a loaded machine matchmaking can leave one live member out
        # of a round the others commit; it then takes their certified state, so the replicas stay identical)
        averaged = [r for r in rounds if not r["adopted"]]
        assert len(averaged) >= 2 and all(r["peers"] == 3 for r in averaged), rounds


def test_a_peer_with_another_tokenizer_is_refused_in_one_line(spawn, write_config, tmp_path) -> None:
    env = {"SWARMLOCO_CACHE": str(tmp_path / "cache")}
    first = spawn("p0", write_config("a.toml", model=LLAMA, data=DATA, swarm=FAST), env=env)
    first.next_round(timeout=240)
    other = write_config("b.toml", model=LLAMA, data={**DATA, "tokenizer_vocab_size": 400}, swarm=FAST)
    odd = spawn("p1", other, initial_peers=first.maddrs(), env=env)
    assert odd.wait(240) == 3
    lines = [line for line in odd.log_text().splitlines() if line.startswith("swarmloco: refused")]
    assert len(lines) == 1 and "data.tokenizer_vocab_size (400 here, 512 in the swarm)" in lines[0], lines


def test_the_tiny_llama_demo_runs_offline_from_its_shipped_config(tmp_path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "swarmloco", "demo", "--config", str(root / "configs" / "llama-tiny.toml"),
                           "--peers", "2", "--outer-steps", "1", "--inner-steps", "2"],
                          capture_output=True, text=True, timeout=400,
                          env={**os.environ, "SWARMLOCO_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "outer   1" in proc.stdout and "in sync" in proc.stdout, proc.stdout
