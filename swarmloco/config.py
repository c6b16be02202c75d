"""Run configuration: one frozen dataclass per component, loaded from TOML and validated at the edge.

The ``model``, ``data``, ``inner``, ``outer``, ``codec`` and ``access`` sections (plus ``run_id`` and ``seed``)
are the *run manifest*: every peer of a swarm must hold exactly the same values (their hash keys every DHT entry).
The ``swarm``, ``checkpoint`` and ``status`` sections are local to one peer and may differ between peers.

A component that owns its settings declares them in its own room and this module gathers them:
``[outer]`` is the outer step's (:mod:`swarmloco.outer_optim.config`), ``[codec]`` the codecs'
(:mod:`swarmloco.compression.registry`: each codec's module declares its keys), the local sections are in
:mod:`swarmloco.local_config`, and the checks every section shares in :mod:`swarmloco.checks`. Every name
below is importable from here.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmloco.checks import (
    ConfigError, check, check_bool, check_in_range, check_non_negative, check_positive, check_sha256, is_int,
    is_number, plain_table, show_value,
)
from swarmloco.compression.registry import CodecConfig
from swarmloco.local_config import CheckpointConfig, StatusConfig, SwarmConfig
from swarmloco.outer_optim.config import OVERLAP_MODES, OuterConfig

__all__ = [
    "ModelConfig",
    "DataConfig",
    "InnerConfig",
    "OuterConfig",
    "CodecConfig",
    "SwarmConfig",
    "CheckpointConfig",
    "StatusConfig",
    "AccessConfig",
    "RunConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "MANIFEST_SECTIONS",
    "ConfigError",
    "show_value",
    "OVERLAP_MODES",
]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model: the built-in nanoGPT-style decoder (``kind = "gpt"``) or a Hugging Face causal LM (``"hf"``)."""

    kind: str = "gpt"
    """Model kind: "gpt" (the built-in nanoGPT, sized by the fields up to dropout) or "hf" (a transformers LM)."""
    vocab_size: int = 256
    """Token vocabulary; 256 for raw bytes."""
    block_size: int = 64
    """Context length in tokens (every kind: the data is cut into sequences this long)."""
    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block."""
    n_embd: int = 128
    """Width of the residual stream; must divide by n_head."""
    dropout: float = 0.0
    """Dropout probability inside blocks."""
    architecture: str = ""
    """kind = "hf": a transformers causal-LM class, e.g. "LlamaForCausalLM", built from `config` and the run seed."""
    config: dict[str, Any] = field(default_factory=dict)
    """kind = "hf": the architecture's config fields as a [model.config] table (vocab_size, hidden_size...)."""
    pretrained: str = ""
    """kind = "hf": a local pretrained model directory (config.json, weights) or a hub model id (fetched if online)."""
    pretrained_sha256: str = ""
    """sha256 of the pretrained model's config.json and weights, checked before loading; prepare_model fills it."""

    def __post_init__(self) -> None:
        check(self.kind in ("gpt", "hf"), "model.kind", self.kind, 'must be "gpt" or "hf"')
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            check(is_int(value) and value > 0, f"model.{name}", value, "must be a positive integer")
        check(self.n_embd % self.n_head == 0, "model.n_embd", self.n_embd, f"must divide by n_head={self.n_head}")
        check_in_range("model.dropout", self.dropout, 0.0, 1.0)
        check(isinstance(self.architecture, str) and (self.architecture == "" or self.architecture.isidentifier()),
              "model.architecture", self.architecture, "must be a transformers class name like LlamaForCausalLM")
        check(isinstance(self.config, dict), "model.config", self.config, "must be a table")
        object.__setattr__(self, "config", plain_table("model.config", self.config))
        check(isinstance(self.pretrained, str), "model.pretrained", self.pretrained, "must be a string")
        check_sha256("model.pretrained_sha256", self.pretrained_sha256)
        if self.kind == "gpt":
            for name in ("architecture", "config", "pretrained", "pretrained_sha256"):
                value = getattr(self, name)
                check(not value, f"model.{name}", value, 'is only for kind = "hf"')
            return
        check(bool(self.architecture or self.pretrained), "model.architecture", self.architecture,
              'kind = "hf" needs an architecture (with a [model.config] table) or a pretrained model')
        check(not (self.config and self.pretrained), "model.config", self.config,
              "must be empty with pretrained (a pretrained model's config is its config.json)")
        check(not self.pretrained_sha256 or bool(self.pretrained), "model.pretrained_sha256",
              self.pretrained_sha256, "needs pretrained")


LOCAL_DATASET_BUILDERS = ("text", "json", "parquet")
"""The ``datasets`` builders that read local files (``data.path``); any other ``data.dataset`` is a hub id."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Text cut into a held-out part and disjoint training shards: raw bytes (``kind = "bytes"``) or a
    tokenized ``datasets`` dataset (``"hf"``)."""

    kind: str = "bytes"
    """Data kind: "bytes" (the bytes of text files, vocab 256) or "hf" (a datasets dataset, tokenized and packed)."""
    path: str = ""
    """A text file or a directory of them (kind = "hf": a local builder's files); empty: the Python stdlib's sources."""
    max_bytes: int = 16_000_000
    """Read at most this many bytes of text (files or examples in order; a streamed dataset is not capped)."""
    holdout_fraction: float = 0.02
    """Tail fraction of the corpus kept for held-out evaluation (a streamed dataset holds out its first examples)."""
    num_shards: int = 64
    """The training part is cut into this many disjoint shards, one per peer (streamed: example index mod shards)."""
    batch_size: int = 16
    """Sequences per inner step on one peer."""
    eval_batches: int = 8
    """Held-out batches evaluated after each outer step (fixed, identical on every peer)."""
    dataset: str = "text"
    """kind = "hf": a builder over `path` ("text": an example per file, "json", "parquet") or a hub id (streamed)."""
    subset: str = ""
    """kind = "hf": the dataset's configuration name (e.g. "sample-10BT"); empty: its default."""
    split: str = "train"
    """kind = "hf": the split to read."""
    text_field: str = "text"
    """kind = "hf": the column holding each example's text."""
    streaming: bool = False
    """kind = "hf": stream the examples instead of tokenizing them all up front (required for a hub dataset)."""
    tokenizer: str = ""
    """kind = "hf": a local directory holding a tokenizer.json; empty: train a byte-level BPE on the run's data."""
    tokenizer_vocab_size: int = 8192
    """Vocabulary of the trained BPE tokenizer, special tokens included."""
    tokenizer_train_bytes: int = 4_000_000
    """The trained tokenizer learns from the first this many bytes of the training text."""
    tokenizer_sha256: str = ""
    """sha256 of the tokenizer's tokenizer.json, proven by every peer; empty: prepare_data fills it in."""
    eos_token: str = "<|endoftext|>"
    """Token appended after each example when packing; must be in the tokenizer's vocabulary."""

    def __post_init__(self) -> None:
        check(self.kind in ("bytes", "hf"), "data.kind", self.kind, 'must be "bytes" or "hf"')
        check(isinstance(self.path, str), "data.path", self.path, "must be a string")
        for name in ("max_bytes", "num_shards", "batch_size", "eval_batches", "tokenizer_train_bytes"):
            value = getattr(self, name)
            check(is_int(value) and value > 0, f"data.{name}", value, "must be a positive integer")
        check(is_number(self.holdout_fraction) and 0.0 < self.holdout_fraction < 0.5, "data.holdout_fraction",
              self.holdout_fraction, "must be a number in (0, 0.5)")
        for name in ("dataset", "split", "text_field", "eos_token"):
            value = getattr(self, name)
            check(isinstance(value, str) and value != "", f"data.{name}", value, "must be a non-empty string")
        for name in ("subset", "tokenizer"):
            check(isinstance(getattr(self, name), str), f"data.{name}", getattr(self, name), "must be a string")
        check_bool("data.streaming", self.streaming)
        check(is_int(self.tokenizer_vocab_size) and self.tokenizer_vocab_size >= 258,
              "data.tokenizer_vocab_size", self.tokenizer_vocab_size,
              "must be an integer >= 258 (256 bytes, the eos token and a merge)")
        check_sha256("data.tokenizer_sha256", self.tokenizer_sha256)
        if self.kind == "bytes":
            for name in ("streaming", "tokenizer", "tokenizer_sha256"):
                value = getattr(self, name)
                check(not value, f"data.{name}", value, 'is only for kind = "hf"')
            return
        if self.dataset not in LOCAL_DATASET_BUILDERS:
            check(self.streaming, "data.streaming", self.streaming,
                  f"must be true for the hub dataset {self.dataset!r} (or use a local builder: "
                  f"{', '.join(LOCAL_DATASET_BUILDERS)})")
            check(self.path == "", "data.path", self.path, f"must be empty for the hub dataset {self.dataset!r}")


@dataclass(frozen=True, kw_only=True)
class InnerConfig:
    """The local AdamW optimizer (defaults from the DiLoCo paper, scaled to small models)."""

    steps: int = 50
    """H: inner steps between two outer steps."""
    lr: float = 1e-3
    """Peak inner learning rate."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    warmup_steps: int = 50
    """Linear warmup of the inner lr over this many inner steps."""
    total_steps: int = 10_000
    """Cosine decay of the inner lr to min_lr_ratio*lr over this many inner steps."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine schedule, as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""

    def __post_init__(self) -> None:
        check(is_int(self.steps) and self.steps > 0, "inner.steps", self.steps, "must be a positive integer")
        check_positive("inner.lr", self.lr)
        check_non_negative("inner.weight_decay", self.weight_decay)
        for name in ("beta1", "beta2"):
            check_in_range(f"inner.{name}", getattr(self, name), 0.0, 1.0)
        check(is_int(self.warmup_steps) and self.warmup_steps >= 0, "inner.warmup_steps",
              self.warmup_steps, "must be a non-negative integer")
        check(is_int(self.total_steps) and self.total_steps > 0, "inner.total_steps",
              self.total_steps, "must be a positive integer")
        check_in_range("inner.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, closed_hi=True)
        check_non_negative("inner.grad_clip", self.grad_clip)


@dataclass(frozen=True, kw_only=True)
class AccessConfig:
    """Who runs the swarm and who may join it (part of the manifest: every peer agrees on it)."""

    owner: str = ""
    """The run owner's Ed25519 public key (64 hex chars): only the owner's signed manifest and access
    tokens count (``swarmloco init-run`` fills it in). Empty: an unowned run (peers trust one another's
    manifests, ``swarmloco run CONFIG`` only)."""
    private: bool = False
    """Only peers holding an unexpired access token signed by the owner may join: the others are refused
    at matchmaking and at state download, and their DHT records are ignored. Needs ``owner`` to run (a
    config for ``swarmloco init-run`` may leave it empty: init-run fills it in)."""

    def __post_init__(self) -> None:
        check(isinstance(self.owner, str) and (self.owner == "" or (len(self.owner) == 64 and all(
            c in "0123456789abcdef" for c in self.owner))), "access.owner", self.owner,
            "must be empty or an Ed25519 public key as 64 lowercase hex chars")
        check(isinstance(self.private, bool), "access.private", self.private, "must be true or false")


MANIFEST_SECTIONS = ("model", "data", "inner", "outer", "codec", "access")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one peer needs: every section of the TOML file (docs/operating.md, "Configuration")."""

    run_id: str = "swarmloco"
    """Name of the run; peers of one swarm share it."""
    seed: int = 0
    """Seed for model initialization and data order."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    status: StatusConfig = field(default_factory=StatusConfig)

    def __post_init__(self) -> None:
        check(isinstance(self.run_id, str) and self.run_id.replace("-", "").replace("_", "").isalnum()
              and len(self.run_id) <= 64, "run_id", self.run_id,
              "must be 1-64 letters, digits, '-' or '_'")
        check(is_int(self.seed) and self.seed >= 0, "seed", self.seed, "must be a non-negative integer")
        self.outer.check_inner_steps(self.inner.steps)
        self.codec.check_outer(self.outer)

    def replace(self, **sections: Any) -> RunConfig:
        """Copy with some top-level fields or whole sections replaced."""
        return dataclasses.replace(self, **sections)

    def manifest_dict(self) -> dict[str, Any]:
        """The part of the config every peer of the swarm must share."""
        full = config_to_dict(self)
        return {"run_id": full["run_id"], "seed": full["seed"], **{s: full[s] for s in MANIFEST_SECTIONS}}


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "inner": InnerConfig,
    "outer": OuterConfig,
    "codec": CodecConfig,
    "access": AccessConfig,
    "swarm": SwarmConfig,
    "checkpoint": CheckpointConfig,
    "status": StatusConfig,
}


def _build_section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config: [{name}] must be a table, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"config: unknown field(s) in [{name}]: {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {}
    for key, value in values.items():
        if isinstance(value, list):
            value = tuple(value)
        default = known[key].default
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"config: [{name}]: {e}") from None


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from nested plain values (as parsed from TOML)."""
    top = {k: v for k, v in data.items() if k not in _SECTIONS}
    unknown = sorted(set(top) - {"run_id", "seed"})
    if unknown:
        raise ValueError(f"config: unknown top-level field(s): {', '.join(unknown)}")
    sections = {name: _build_section(name, cls, data.get(name, {})) for name, cls in _SECTIONS.items()}
    tuned, given = sections["codec"].outer_defaults, data.get("outer", {})
    if not tuned.keys() <= given.keys():  # (the codec's outer step where unset)
        sections["outer"] = _build_section("outer", OuterConfig, {**tuned, **given})
    return RunConfig(**top, **sections)


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """Nested plain values (lists for tuples), suitable for TOML, msgpack or JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(config)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a TOML file (None: all defaults) and apply dotted overrides like {"swarm.min_peers": 3}."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ValueError(f"config: file not found: {path}") from None
        except IsADirectoryError:
            raise ValueError(f"config: {path} is a directory, not a TOML file") from None
        except OSError as e:
            raise ValueError(f"config: cannot read {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"config: {path} is not a text (UTF-8) TOML file (byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config: {path} is not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"config: [{key}] must be a table, got {type(node).__name__}")
        node[leaf] = value
    return config_from_dict(data)


def dump_toml(config: RunConfig) -> str:
    """Render a config as TOML (used by the demo to hand each peer its file)."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(value, list):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{key(k)} = {fmt(v)}" for k, v in value.items()) + "}"
        return repr(value)

    def key(name: str) -> str:
        return name if name and all(c.isalnum() or c in "-_" for c in name) and name.isascii() else fmt(name)

    data = config_to_dict(config)
    lines = [f"{k} = {fmt(data[k])}" for k in ("run_id", "seed")]
    for name in _SECTIONS:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {fmt(v)}" for k, v in data[name].items())
    return "\n".join(lines) + "\n"
