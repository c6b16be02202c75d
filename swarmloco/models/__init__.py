"""Model kinds built from a run config (a Python user brings any ``torch.nn.Module``), and what the manifest
knows about a model.

* ``kind = "gpt"``: the built-in byte-level nanoGPT (``models/gpt.py``);
* ``kind = "hf"``: a transformers causal LM from a config in the manifest, or pretrained (``models/hf.py``).

``prepare_model`` resolves what the manifest must pin (a pretrained model's sha256) before it is hashed;
``build_model`` builds the same model on every peer from the run seed; ``lm_loss`` is the next-token
cross-entropy of any of them. (The manifest's fingerprint of any model is the engine's:
:func:`swarmloco.node.diloco.fingerprint`.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swarmloco.config import ModelConfig
from swarmloco.models.gpt import GPT, num_params

__all__ = ["GPT", "build_model", "check_vocab", "lm_loss", "model_vocab_size", "num_params", "prepare_model"]


def prepare_model(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with ``pretrained_sha256`` filled in (a pretrained hf model), or checked if it is set."""
    if cfg.kind == "hf" and cfg.pretrained:
        from swarmloco.models.hf import prepare_hf_model

        return prepare_hf_model(cfg)
    return cfg


def build_model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """The run's model, fp32 on the CPU, initialised from ``seed`` alike on every peer."""
    if cfg.kind == "gpt":
        return GPT(cfg, seed=seed)
    from swarmloco.models.hf import build_hf_model

    return build_hf_model(cfg, seed)


def _is_transformers(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "get_input_embeddings")


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32 scalar) of ``model`` on inputs ``x`` and targets ``y`` (``x`` shifted by
    one, as the corpora yield them). Works for the built-in GPT, any transformers causal LM, and any module
    whose forward(x) returns logits (a tensor, a tuple starting with them, or an object with ``.logits``)."""
    if isinstance(model, GPT):
        return model(x, y)[1]
    out = model(input_ids=x, use_cache=False) if _is_transformers(model) else model(x)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def model_vocab_size(model: torch.nn.Module) -> int | None:
    """Rows of the model's token embedding, when it has one we know of."""
    if isinstance(model, GPT):
        return model.cfg.vocab_size
    if _is_transformers(model):
        return model.get_input_embeddings().num_embeddings
    return None


def check_vocab(model: torch.nn.Module, vocab_size: int) -> None:
    """Refuse (one-line ValueError) a model whose embedding has fewer rows than the data's tokenizer has tokens.

    A larger model vocabulary is fine (padded rows are never looked up)."""
    rows = model_vocab_size(model)
    if rows is None or rows >= vocab_size:
        return
    field = "model.vocab_size" if isinstance(model, GPT) else (
        "model.config.vocab_size" if not getattr(model.config, "_name_or_path", "") else "the pretrained vocab_size")
    raise ValueError(f"{field}={rows} is smaller than the data's vocabulary ({vocab_size} tokens): token ids past "
                     f"{rows - 1} would have no embedding")

