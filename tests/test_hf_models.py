"""Hugging Face model kind: built alike from the seed, pretrained weights pinned by their hash, fingerprints
that name the first differing parameter, and bad configs refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from swarmloco.config import (
    ModelConfig,
    RunConfig,
    config_from_dict,
    dump_toml,
    load_config,
)
from swarmloco.models import (
    build_model,
    check_vocab,
    lm_loss,
    num_params,
    prepare_model,
)
from swarmloco.models.hf import pretrained_digest
from swarmloco.node.diloco import fingerprint
from swarmloco.protocol.manifest import RunManifest, diff_fields, first_difference

ROOT = Path(__file__).parent.parent
TINY_LLAMA = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def llama(**overrides) -> ModelConfig:
    return ModelConfig(kind="hf", architecture="LlamaForCausalLM", block_size=32, config={**TINY_LLAMA, **overrides})


def same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def one_line_error(call, *match: str) -> str:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for part in match:
        assert part in message, message
    return message


def test_seed_alone_decides_the_initial_weights_and_the_caller_rng_is_untouched() -> None:
    before = torch.random.get_rng_state()
    a, b, c = build_model(llama(), 7), build_model(llama(), 7), build_model(llama(), 8)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert same_params(a, b) and not same_params(a, c)
    assert all(p.dtype == torch.float32 for p in a.parameters()) and a.training


def test_lm_loss_is_the_shifted_next_token_loss_of_every_kind() -> None:
    seq = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(0))
    x, y = seq[:, :-1], seq[:, 1:]
    hf = build_model(llama(), 0)
    reference = hf(input_ids=seq, labels=seq).loss  # transformers shifts the labels itself
    assert torch.allclose(lm_loss(hf, x, y), reference, rtol=1e-5)
    gpt = build_model(ModelConfig(block_size=32, n_layer=1, n_embd=32, n_head=2, vocab_size=300), 0)
    assert torch.equal(lm_loss(gpt, x, y), gpt(x, y)[1])
    plain = torch.nn.Sequential(torch.nn.Embedding(300, 8), torch.nn.Linear(8, 300))
    loss = lm_loss(plain, x, y)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and loss.requires_grad


def test_pretrained_directory_is_loaded_only_with_its_sha256(tmp_path: Path) -> None:
    source = build_model(llama(), 3)
    source.save_pretrained(tmp_path / "ckpt")
    cfg = ModelConfig(kind="hf", block_size=32, pretrained=str(tmp_path / "ckpt"))
    one_line_error(lambda: build_model(cfg, 0), "model.pretrained_sha256", "prepare_model")
    pinned = prepare_model(cfg)
    assert pinned.pretrained_sha256 == pretrained_digest(tmp_path / "ckpt") and prepare_model(pinned) == pinned
    assert same_params(build_model(pinned, 0), source)  # the seed does not matter: the weights are the file's

    config_file = tmp_path / "ckpt" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "rms_norm_eps": 1e-5}))
    one_line_error(lambda: build_model(pinned, 0), "model.pretrained_sha256=", "sha256")
    one_line_error(lambda: prepare_model(pinned), "model.pretrained_sha256=")


@pytest.mark.parametrize("pretrained, files, match", [
    ("missing", None, "no such directory"),
    ("ckpt", ["config.json"], "has no weights"),
    ("ckpt", ["model.safetensors"], "has no config.json"),
])
def test_pretrained_directory_without_its_files_is_refused(tmp_path: Path, pretrained, files, match) -> None:
    (tmp_path / "ckpt").mkdir()
    for name in files or []:
        (tmp_path / "ckpt" / name).write_text("{}")
    cfg = ModelConfig(kind="hf", block_size=32, pretrained=str(tmp_path / pretrained))
    one_line_error(lambda: prepare_model(cfg), "model.pretrained=", match)


def test_hub_model_on_an_offline_machine_is_one_line_naming_the_field(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(kind="hf", block_size=32, pretrained="no-such-org/no-such-model-swarmloco")
    one_line_error(lambda: prepare_model(cfg), "model.pretrained='no-such-org/no-such-model-swarmloco'", "offline")


@pytest.mark.parametrize("cfg, match", [
    (lambda: ModelConfig(kind="hf", architecture="LlamaForCausalLMX", block_size=32), "model.architecture="),
    (lambda: ModelConfig(kind="hf", architecture="BertModel", block_size=32), "not a transformers causal-LM"),
    (lambda: llama(hidden_sizee=64), "model.config.hidden_sizee"),
    (lambda: llama(hidden_size=30), "model.config: LlamaConfig refuses"),
    (lambda: llama(num_hidden_layers="two"), "model.config: LlamaConfig refuses"),
    (lambda: llama(max_position_embeddings=16), "model.config.max_position_embeddings=16"),
    (lambda: ModelConfig(kind="hf", architecture="GPT2LMHeadModel", block_size=128, config={"n_positions": 64}),
     "model.config.n_positions=64 is shorter than model.block_size=128"),
])
def test_bad_hf_model_configs_are_refused_in_one_line(cfg, match) -> None:
    one_line_error(lambda: build_model(cfg(), 0), match)


@pytest.mark.parametrize("model, field", [
    ({"kind": "hf"}, "model.architecture"),
    ({"kind": "transformer"}, "model.kind"),
    ({"architecture": "LlamaForCausalLM"}, "model.architecture"),
    ({"kind": "hf", "pretrained": "x", "config": {"hidden_size": 8}}, "model.config"),
    ({"kind": "hf", "architecture": "LlamaForCausalLM", "pretrained_sha256": "0" * 64}, "model.pretrained_sha256"),
    ({"kind": "hf", "pretrained": "x", "pretrained_sha256": "abc"}, "model.pretrained_sha256"),
    ({"kind": "hf", "architecture": "Llama-Causal"}, "model.architecture"),
    ({"kind": "hf", "architecture": "LlamaForCausalLM", "config": {"rope": float("nan")}}, "model.config.rope"),
])
def test_model_config_fields_are_validated_at_load(model, field) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config_from_dict({"model": model})


def test_model_config_table_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = config_from_dict({"model": {"kind": "hf", "architecture": "LlamaForCausalLM",
                                      "config": {**TINY_LLAMA, "rope_parameters": {"rope_type": "default",
                                                                                   "rope_theta": 10000.0}}}})
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path) == cfg


def test_a_different_model_has_a_different_fingerprint_naming_the_first_differing_parameter() -> None:
    mine = fingerprint(build_model(llama(), 0))
    assert mine["model.embed_tokens.weight"] == "300x32:float32"
    assert first_difference(mine, fingerprint(build_model(llama(), 1))) is None  # the seed is not the shape
    manifests = [RunManifest.from_config(RunConfig(model=m)).data for m in (llama(), llama(intermediate_size=96))]
    assert [d.split(" ")[0] for d in diff_fields(*manifests)] == ["model.config.intermediate_size"]
    theirs = fingerprint(build_model(llama(intermediate_size=96), 0))
    assert first_difference(mine, theirs) == \
        "parameter model.layers.0.mlp.gate_proj.weight is 64x32:float32 here, 96x32:float32 in the swarm"
    deeper = fingerprint(build_model(llama(num_hidden_layers=3), 0))
    assert first_difference(mine, deeper).startswith("parameter model.layers.2.")
    assert "in this model, not in the swarm's" in first_difference(deeper, mine)


def test_a_model_vocabulary_smaller_than_the_tokenizers_is_refused() -> None:
    check_vocab(build_model(llama(), 0), 300)
    check_vocab(build_model(llama(), 0), 257)  # padded rows are fine
    one_line_error(lambda: check_vocab(build_model(llama(), 0), 301), "model.config.vocab_size=300", "301 tokens")
    gpt = build_model(ModelConfig(), 0)
    one_line_error(lambda: check_vocab(gpt, 4096), "model.vocab_size=256")


def test_shipped_llama_configs_have_the_promised_sizes() -> None:
    tiny, big = load_config(ROOT / "configs/llama-tiny.toml"), load_config(ROOT / "configs/llama-124m.toml")
    assert 1_000_000 < num_params(build_model(tiny.model, tiny.seed)) < 5_000_000
    assert tiny.model.config["vocab_size"] >= tiny.data.tokenizer_vocab_size
    with torch.device("meta"):
        assert 120_000_000 < num_params(build_model(big.model, big.seed)) < 128_000_000
    assert big.model.config["vocab_size"] >= big.data.tokenizer_vocab_size
