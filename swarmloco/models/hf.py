"""Hugging Face ``transformers`` causal LMs as a model kind (``[model] kind = "hf"``).

Two ways to get one, both the same on every peer:

* **from a config held in the manifest**: ``architecture = "LlamaForCausalLM"`` and a ``[model.config]``
  table of its config class's fields, initialised by the architecture's own init from torch's CPU generator
  seeded with the run seed (inside ``torch.random.fork_rng``: the caller's RNG state is untouched); the same
  seed, torch and transformers give every peer the same bytes;
* **pretrained**: a local directory (``config.json`` and ``*.safetensors`` / ``pytorch_model*.bin``), whose
  sha256 (``pretrained_sha256``, :func:`pretrained_digest`) is in the manifest and checked before anything is
  loaded; or a hub model id, downloaded only when online (else one line naming ``model.pretrained``).

``transformers`` is imported here only, and only when a run uses it (it takes seconds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
from pathlib import Path
from typing import Any

import torch

from swarmloco.config import ModelConfig
from swarmloco.hub import hub_offline, offline_error, one_line

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model*.bin.index.json")
"""The files of a pretrained directory that make up the model (and its hash)."""

_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def causal_lm_class(name: str, field: str = "model.architecture") -> type:
    """The transformers class of a causal-LM architecture (ValueError in one line if there is none)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    known = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if name not in known:
        close = sorted(k for k in known if k.lower().startswith(name[:4].lower()))[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else " (e.g. LlamaForCausalLM, GPT2LMHeadModel)"
        raise ValueError(f"{field}={name!r} is not a transformers causal-LM architecture{hint}")
    try:
        return getattr(transformers, name)
    except Exception as e:  # noqa: BLE001 - an architecture whose extra dependencies are missing
        raise ValueError(f"{field}={name!r} cannot be imported: {one_line(e)}") from None


def config_fields(config_class: type) -> set[str]:
    """The field names a transformers config class accepts."""
    if dataclasses.is_dataclass(config_class):
        return {f.name for f in dataclasses.fields(config_class)}
    names = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    return names | set(config_class().to_dict())


def make_config(cls: type, values: dict[str, Any]) -> Any:
    """The architecture's config object from the ``[model.config]`` table (unknown or bad fields refused)."""
    config_class = cls.config_class
    unknown = sorted(set(values) - config_fields(config_class))
    if unknown:
        raise ValueError(f"model.config.{unknown[0]}={values[unknown[0]]!r} is not a field of "
                         f"{config_class.__name__} (architecture {cls.__name__})")
    try:
        return config_class(**values)
    except Exception as e:  # noqa: BLE001 - transformers' strict-dataclass and validator errors
        raise ValueError(f"model.config: {config_class.__name__} refuses these values: {one_line(e)}") from None


def _check_context(config: Any, block_size: int, given: dict[str, Any]) -> None:
    """Refuse a context window shorter than block_size, naming the field as the user wrote it (GPT-2's
    ``n_positions`` also answers to ``max_position_embeddings``)."""
    for name in sorted(_POSITION_FIELDS, key=lambda n: n not in given):
        limit = getattr(config, name, None)
        if isinstance(limit, int) and limit < block_size:
            raise ValueError(f"model.config.{name}={limit} is shorter than model.block_size={block_size}")


def pretrained_digest(directory: str | Path) -> str:
    """sha256 over the model files of a pretrained directory: the text ``"<sha256>  <name>\\n"`` (as
    ``sha256sum`` prints it) for each of config.json and the weight files, sorted by name."""
    root = Path(directory)
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in root.glob(pattern) if p.is_file()},
                   key=lambda p: p.name)
    lines = []
    for path in files:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        lines.append(f"{h.hexdigest()}  {path.name}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def pretrained_dir(cfg: ModelConfig) -> Path:
    """The local directory of ``model.pretrained``: itself, or the hub model's download (online only)."""
    local = Path(cfg.pretrained).expanduser()
    if local.is_dir():
        root = local
    elif local.exists() or cfg.pretrained.startswith((".", "/", "~")) or cfg.pretrained.count("/") > 1:
        raise ValueError(f"model.pretrained={cfg.pretrained!r}: no such directory (nor a hub id like org/name)")
    else:
        root = _download(cfg.pretrained)
    if not (root / "config.json").is_file():
        raise ValueError(f"model.pretrained={cfg.pretrained!r}: {root} has no config.json")
    if not any(p.name != "config.json" for pattern in WEIGHT_PATTERNS for p in root.glob(pattern)):
        raise ValueError(f"model.pretrained={cfg.pretrained!r}: {root} has no weights (*.safetensors or "
                         "pytorch_model*.bin)")
    return root


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(WEIGHT_PATTERNS), local_files_only=hub_offline()))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, network errors
        if hub_offline():
            raise offline_error("model.pretrained", repo_id, "model") from None
        raise ValueError(f"model.pretrained={repo_id!r}: cannot download it from the hub: {one_line(e)}") from None


def _verified_digest(cfg: ModelConfig, root: Path) -> str:
    digest = pretrained_digest(root)
    if cfg.pretrained_sha256 and cfg.pretrained_sha256 != digest:
        raise ValueError(f"model.pretrained_sha256={cfg.pretrained_sha256[:16]}...: the files of "
                         f"{cfg.pretrained!r} here have sha256 {digest[:16]}... (another model or revision)")
    return digest


def prepare_hf_model(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with ``pretrained_sha256`` filled in, or checked if it is set (one-line ValueError)."""
    if not cfg.pretrained:
        return cfg
    return dataclasses.replace(cfg, pretrained_sha256=_verified_digest(cfg, pretrained_dir(cfg)))


def build_hf_model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """The run's transformers model, fp32, on the CPU, in train mode."""
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: models are built on the CPU
        torch.default_generator.manual_seed(seed)
        model = _load_pretrained(cfg) if cfg.pretrained else _from_config(cfg)
    _check_context(model.config, cfg.block_size, cfg.config)
    model.config.use_cache = False
    return model.float().train()


def _from_config(cfg: ModelConfig) -> torch.nn.Module:
    cls = causal_lm_class(cfg.architecture)
    config = make_config(cls, cfg.config)
    _check_context(config, cfg.block_size, cfg.config)
    return cls(config)


def _load_pretrained(cfg: ModelConfig) -> torch.nn.Module:
    root = pretrained_dir(cfg)
    if not cfg.pretrained_sha256:
        raise ValueError(f"model.pretrained_sha256='': the weights of {cfg.pretrained!r} must be pinned by their "
                         "hash in the manifest; prepare_model(cfg) fills it in")
    _verified_digest(cfg, root)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cls = causal_lm_class(cfg.architecture) if cfg.architecture else transformers.AutoModelForCausalLM
    try:
        return cls.from_pretrained(root, dtype=torch.float32, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a config or weights transformers cannot read
        raise ValueError(f"model.pretrained={cfg.pretrained!r}: cannot load it: {one_line(e)}") from None
