"""Two fresh processes (other hash seeds, other thread counts) build the same hf model from the run seed and
train the same tokenizer from the run's data, byte for byte: what lets every peer prove it holds them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from swarmloco.config import config_from_dict, dump_toml

HERE = Path(__file__).parent
RUN = {
    "model": {"kind": "hf", "architecture": "LlamaForCausalLM", "block_size": 32,
              "config": {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}},
    "data": {"kind": "hf", "path": str(Path(sysconfig.get_paths()["stdlib"]) / "json"), "tokenizer_vocab_size": 512,
             "num_shards": 2},
    "seed": 11,
}


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("probe")
    (tmp / "run.toml").write_text(dump_toml(config_from_dict(RUN)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(HERE / "hf_probe.py"), str(tmp / "run.toml"), str(tmp / f"cache{i}")],
                              env={**env, "PYTHONHASHSEED": str(i + 1), "RAYON_NUM_THREADS": str(i + 1),
                                   "OMP_NUM_THREADS": str(i + 1)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=180)
        finally:
            proc.kill()
        assert proc.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.mark.slow
def test_hf_model_from_config_is_initialised_identically_in_two_processes(probes) -> None:
    assert probes[0]["params"] == probes[1]["params"]


@pytest.mark.slow
def test_trained_tokenizer_is_byte_identical_in_two_processes(probes) -> None:
    a, b = probes
    assert a["tokenizer_files"] == b["tokenizer_files"] and len(a["tokenizer_files"]) == 1
    assert a["tokenizer_sha256"] == b["tokenizer_sha256"] == next(iter(a["tokenizer_files"].values()))
