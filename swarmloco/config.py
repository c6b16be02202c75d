"""Run configuration: one frozen dataclass per component, loaded from TOML and validated at the edge.

The ``model``, ``data``, ``inner``, ``outer`` and ``codec`` sections (plus ``run_id`` and ``seed``) are the
*run manifest*: every peer of a swarm must hold exactly the same values (their hash keys every DHT entry).
The ``swarm``, ``checkpoint`` and ``status`` sections are local to one peer and may differ between peers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
]


class ConfigError(ValueError):
    """A config value is refused: ``field`` (dotted, as in the TOML file), the ``value``, and ``why``."""

    def __init__(self, field: str, value: Any, why: str):
        super().__init__(f"config: {field} = {show_value(value)} is invalid: {why}")
        self.field, self.value, self.why = field, value, why


def show_value(value: Any) -> str:
    """A value as the user wrote it in TOML (not as a Python repr: lists, not tuples; true, not True)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {show_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return str(value)


def _check(cond: bool, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(name, value, why)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(name: str, value: float) -> None:
    _check(_is_number(value) and value > 0, name, value, "must be a number > 0")


def _non_negative(name: str, value: float) -> None:
    _check(_is_number(value) and value >= 0, name, value, "must be a number >= 0")


def _in_range(name: str, value: Any, lo: float, hi: float, closed_hi: bool = False) -> None:
    ok = _is_number(value) and lo <= value and (value <= hi if closed_hi else value < hi)
    _check(ok, name, value, f"must be a number in [{lo:g}, {hi:g}{']' if closed_hi else ')'}")


def _bool(name: str, value: Any) -> None:
    _check(isinstance(value, bool), name, value, "must be true or false")


_SHA256_HEX = frozenset("0123456789abcdef")


def _sha256_field(name: str, value: Any) -> None:
    _check(isinstance(value, str) and (value == "" or (len(value) == 64 and set(value) <= _SHA256_HEX)), name, value,
           "must be empty or a sha256 as 64 lowercase hex chars")


def _plain_table(name: str, value: Any) -> Any:
    """A deep copy of a TOML-like value (tuples become lists), or a ValueError naming the first bad entry."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            _check(isinstance(key, str) and key != "", name, key, "table keys must be non-empty strings")
            out[key] = _plain_table(f"{name}.{key}", item)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain_table(f"{name}[{i}]", item) for i, item in enumerate(value)]
    _check(isinstance(value, (str, int, float, bool)) and (not isinstance(value, float) or math.isfinite(value)),
           name, value, "must be a string, number, boolean, list or table")
    return value


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
        _check(self.kind in ("gpt", "hf"), "model.kind", self.kind, 'must be "gpt" or "hf"')
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            _check(_is_int(value) and value > 0, f"model.{name}", value, "must be a positive integer")
        _check(self.n_embd % self.n_head == 0, "model.n_embd", self.n_embd, f"must divide by n_head={self.n_head}")
        _in_range("model.dropout", self.dropout, 0.0, 1.0)
        _check(isinstance(self.architecture, str) and (self.architecture == "" or self.architecture.isidentifier()),
               "model.architecture", self.architecture, "must be a transformers class name like LlamaForCausalLM")
        _check(isinstance(self.config, dict), "model.config", self.config, "must be a table")
        object.__setattr__(self, "config", _plain_table("model.config", self.config))
        _check(isinstance(self.pretrained, str), "model.pretrained", self.pretrained, "must be a string")
        _sha256_field("model.pretrained_sha256", self.pretrained_sha256)
        if self.kind == "gpt":
            for name in ("architecture", "config", "pretrained", "pretrained_sha256"):
                value = getattr(self, name)
                _check(not value, f"model.{name}", value, 'is only for kind = "hf"')
            return
        _check(bool(self.architecture or self.pretrained), "model.architecture", self.architecture,
               'kind = "hf" needs an architecture (with a [model.config] table) or a pretrained model')
        _check(not (self.config and self.pretrained), "model.config", self.config,
               "must be empty with pretrained (a pretrained model's config is its config.json)")
        _check(not self.pretrained_sha256 or bool(self.pretrained), "model.pretrained_sha256",
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
        _check(self.kind in ("bytes", "hf"), "data.kind", self.kind, 'must be "bytes" or "hf"')
        _check(isinstance(self.path, str), "data.path", self.path, "must be a string")
        for name in ("max_bytes", "num_shards", "batch_size", "eval_batches", "tokenizer_train_bytes"):
            value = getattr(self, name)
            _check(_is_int(value) and value > 0, f"data.{name}", value, "must be a positive integer")
        _check(_is_number(self.holdout_fraction) and 0.0 < self.holdout_fraction < 0.5, "data.holdout_fraction",
               self.holdout_fraction, "must be a number in (0, 0.5)")
        for name in ("dataset", "split", "text_field", "eos_token"):
            value = getattr(self, name)
            _check(isinstance(value, str) and value != "", f"data.{name}", value, "must be a non-empty string")
        for name in ("subset", "tokenizer"):
            _check(isinstance(getattr(self, name), str), f"data.{name}", getattr(self, name), "must be a string")
        _bool("data.streaming", self.streaming)
        _check(_is_int(self.tokenizer_vocab_size) and self.tokenizer_vocab_size >= 258,
               "data.tokenizer_vocab_size", self.tokenizer_vocab_size,
               "must be an integer >= 258 (256 bytes, the eos token and a merge)")
        _sha256_field("data.tokenizer_sha256", self.tokenizer_sha256)
        if self.kind == "bytes":
            for name in ("streaming", "tokenizer", "tokenizer_sha256"):
                value = getattr(self, name)
                _check(not value, f"data.{name}", value, 'is only for kind = "hf"')
            return
        if self.dataset not in LOCAL_DATASET_BUILDERS:
            _check(self.streaming, "data.streaming", self.streaming,
                   f"must be true for the hub dataset {self.dataset!r} (or use a local builder: "
                   f"{', '.join(LOCAL_DATASET_BUILDERS)})")
            _check(self.path == "", "data.path", self.path, f"must be empty for the hub dataset {self.dataset!r}")


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
        _check(_is_int(self.steps) and self.steps > 0, "inner.steps", self.steps, "must be a positive integer")
        _positive("inner.lr", self.lr)
        _non_negative("inner.weight_decay", self.weight_decay)
        for name in ("beta1", "beta2"):
            _in_range(f"inner.{name}", getattr(self, name), 0.0, 1.0)
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "inner.warmup_steps",
               self.warmup_steps, "must be a non-negative integer")
        _check(_is_int(self.total_steps) and self.total_steps > 0, "inner.total_steps",
               self.total_steps, "must be a positive integer")
        _in_range("inner.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, closed_hi=True)
        _non_negative("inner.grad_clip", self.grad_clip)


OVERLAP_MODES = ("none", "delayed", "eager")


@dataclass(frozen=True, kw_only=True)
class OuterConfig:
    """The outer optimizer: SGD with (Nesterov) momentum on the averaged pseudo-gradient."""

    lr: float = 1.0
    """Outer learning rate (DiLoCo's paper: 0.7; 1.0 with momentum 0.7 was the best of BENCHMARKS.md's grid
    at K=4, H=30, and meets the H=100 target). lr=1, momentum=0 is plain parameter averaging."""
    momentum: float = 0.7
    """Outer momentum (DiLoCo's paper: 0.9, which over-shoots at tens of rounds: BENCHMARKS.md)."""
    nesterov: bool = True
    """Nesterov momentum (DiLoCo) rather than heavy-ball."""
    target_samples: int = 0
    """Swarm-wide samples per outer step: a round starts when the live peers together processed this
    many since the last one (each weighted by its own samples), so slow peers contribute fewer inner
    steps instead of making everyone wait. 0: every peer runs inner.steps steps per round."""
    clip_factor: float = 4.0
    """Contributions are checked before they are averaged: a pseudo-gradient (part) whose norm exceeds
    clip_factor x the lower median of the group's is scaled down to it, and so is a claimed sample
    count (weight); applied when at least 3 peers of the group trained since the last round. 0 turns
    the check off (plain weighted mean)."""
    overlap: str = "none"
    """How a round overlaps the next inner steps: "none" (training waits for the round), "delayed" (training
    goes on from the local params while the round runs; its result lands overlap_steps later) or "eager"
    (as delayed, but the local params first take the outer step with this peer's own pseudo-gradient, and
    are corrected by the group's average when it lands; arXiv 2502.12996). ARCHITECTURE.md: the exact rules."""
    overlap_steps: int = 0
    """tau: a round's result is applied exactly this many inner steps after the round started (training
    waits there if it has not landed yet); 1 .. inner.steps. 0: as soon as it has landed (at the first inner
    step after its exchange ended; at the latest when its parameters are synced again, inner.steps after it
    started): no wait while rounds keep up with training, and no staleness beyond what the link costs. With
    fragments several rounds can be in flight (their exchanges run one after another). Only with overlap =
    "delayed" or "eager"."""
    overlap_alpha: float = 1.0
    """When a round lands, the local params become new_global + overlap_alpha x (local - proxy): the share
    of the inner progress made while the round ran that is kept (1: all of it; 0: restart from the new
    global params, torchft's fragment_update_alpha = 0)."""
    fragments: int = 1
    """Streaming DiLoCo (arXiv 2501.18512): the parameters are split into this many fragments of whole
    layers; a round every inner.steps / fragments inner steps syncs one of them in turn, so each fragment is
    synced every inner.steps steps and a round moves 1/fragments of the bytes. 1: every round syncs all."""

    @classmethod
    def for_codec(cls, codec: CodecConfig, **fields: Any) -> OuterConfig:
        """These outer settings, with ``lr`` and ``momentum`` the codec's tuning (``CodecInfo.outer``: ``hadtopk``'s
        1.6 / 0.6) where ``fields`` leave them unset, else the defaults."""
        return cls(**{**codec.outer_defaults, **fields})

    def __post_init__(self) -> None:
        _positive("outer.lr", self.lr)
        _check(_is_number(self.clip_factor) and (self.clip_factor == 0 or self.clip_factor >= 1),
               "outer.clip_factor", self.clip_factor, "must be 0 (off) or a number >= 1")
        _check(_is_int(self.target_samples) and self.target_samples >= 0, "outer.target_samples",
               self.target_samples, "must be an integer >= 0")
        _in_range("outer.momentum", self.momentum, 0.0, 1.0)
        _bool("outer.nesterov", self.nesterov)
        _check(not self.nesterov or self.momentum > 0, "outer.nesterov", self.nesterov, "needs momentum > 0")
        _check(self.overlap in OVERLAP_MODES, "outer.overlap", self.overlap,
               f"must be one of {', '.join(map(show_value, OVERLAP_MODES))}")
        _check(_is_int(self.overlap_steps) and self.overlap_steps >= 0, "outer.overlap_steps", self.overlap_steps,
               "must be an integer >= 0")
        _check(self.overlap != "none" or self.overlap_steps == 0, "outer.overlap_steps", self.overlap_steps,
               'needs overlap = "delayed" or "eager" (with overlap = "none" training waits for every round)')
        _in_range("outer.overlap_alpha", self.overlap_alpha, 0.0, 1.0, closed_hi=True)
        _check(_is_int(self.fragments) and 1 <= self.fragments <= 256, "outer.fragments", self.fragments,
               "must be an integer from 1 to 256")
        _check(self.overlap == "none" or not self.target_samples, "outer.overlap", self.overlap,
               "cannot be combined with target_samples yet (a round's size would depend on the overlap)")

    def check_inner_steps(self, inner_steps: int, field: str = "inner.steps") -> None:
        """The checks that need H: fragments divide it, overlap_steps at most H."""
        _check(inner_steps % self.fragments == 0, field, inner_steps,
               f"must be a multiple of outer.fragments = {self.fragments} (a fragment is synced every "
               f"{field} steps, one every {field} / fragments)")
        _check(self.overlap_steps <= inner_steps, "outer.overlap_steps", self.overlap_steps,
               f"must be at most {field} = {inner_steps} (a round lands before its parameters are synced again)")

    @property
    def overlapped(self) -> bool:
        """Rounds run behind the next inner steps (overlap "delayed" or "eager")."""
        return self.overlap != "none"

    def delay_steps(self, inner_steps: int) -> int:
        """tau: inner steps between a round's start and the moment its result is applied at the latest (0:
        blocking; with ``overlap_steps = 0`` ``inner_steps``, when its parameters are synced again)."""
        if not self.overlapped:
            return 0
        return self.overlap_steps or inner_steps


@dataclass(frozen=True, kw_only=True)
class CodecConfig:
    """How pseudo-gradients are encoded on the wire."""

    name: str = "none"
    """Codec name: none (fp32), fp16, bf16, int8, int4, topk (SparseLoCo), rotate (a shared rotating share of the
    coordinates at 1 bit, the rest kept in the model), hadtopk (each chunk's largest Hadamard coefficients at
    1 bit, the rest kept in the model); see swarmloco.compression."""
    block_size: int = 256
    """Values per scale block for the blockwise quantizers (int8, int4)."""
    topk_fraction: float = 0.015625
    """topk: fraction of each chunk's values sent (SparseLoCo: 64 of 4096, 1.56%)."""
    topk_chunk: int = 4096
    """topk: values per chunk; each chunk sends its own largest entries."""
    topk_decay: float = 0.95
    """topk: decay of the error-feedback accumulator (SparseLoCo's beta; it acts as the outer momentum,
    so use it with outer.momentum = 0). The dense codecs' error feedback does not decay."""
    rotate_every: int = 4
    """rotate: each coordinate is sent once every this many rounds (a round sends 1 / rotate_every of them)."""
    rotate_chunk: int = 4096
    """rotate: values per chunk (a multiple of rotate_every; a power of two with the hadamard basis); each chunk
    sends one bf16 level, and tensors shorter than a chunk are sent whole."""
    rotate_basis: str = "hadamard"
    """rotate: "hadamard" sends a share of each chunk's coefficients after a fixed random rotation (every value
    moves a little each round; the better one, BENCHMARKS.md), "coords" a share of the values themselves."""
    hadtopk_fraction: float = 0.03125
    """hadtopk: fraction of each chunk's coefficients sent (1/32: 128 of 4096, 126x below fp32)."""
    hadtopk_chunk: int = 4096
    """hadtopk: values per chunk (a power of two); each chunk is turned and sends its own largest coefficients
    and one bf16 level; tensors shorter than a chunk are sent whole."""
    error_feedback: bool = True
    """Carry what compression dropped from a peer's pseudo-gradient into its next one (rotate, hadtopk: in the
    peer's own parameters; it cannot be turned off there)."""

    def __post_init__(self) -> None:
        from swarmloco.compression.registry import codec_names  # (the registry imports this module)

        names = codec_names()
        _check(isinstance(self.name, str) and self.name in names, "codec.name", self.name,
               f"must be one of {', '.join(names)}")
        _check(_is_int(self.block_size) and self.block_size > 0, "codec.block_size", self.block_size,
               "must be a positive integer")
        _check(_is_number(self.topk_fraction) and 0.0 < self.topk_fraction <= 1.0,
               "codec.topk_fraction", self.topk_fraction, "must be in (0, 1]")
        _check(_is_int(self.topk_chunk) and 1 <= self.topk_chunk <= 65536, "codec.topk_chunk",
               self.topk_chunk, "must be an integer in 1..65536")
        _check(_is_number(self.topk_decay) and 0.0 <= self.topk_decay <= 1.0, "codec.topk_decay",
               self.topk_decay, "must be in [0, 1]")
        _check(_is_int(self.rotate_every) and 1 <= self.rotate_every <= 256, "codec.rotate_every",
               self.rotate_every, "must be an integer in 1..256")
        _check(_is_int(self.rotate_chunk) and 1 <= self.rotate_chunk <= 65536
               and self.rotate_chunk % self.rotate_every == 0, "codec.rotate_chunk", self.rotate_chunk,
               f"must be an integer in 1..65536 and a multiple of rotate_every = {self.rotate_every}")
        _check(self.rotate_basis in ("hadamard", "coords"), "codec.rotate_basis", self.rotate_basis,
               'must be "hadamard" or "coords"')
        _check(self.name != "rotate" or self.rotate_basis != "hadamard"
               or self.rotate_chunk & (self.rotate_chunk - 1) == 0, "codec.rotate_chunk", self.rotate_chunk,
               'must be a power of two with rotate_basis = "hadamard"')
        _check(_is_number(self.hadtopk_fraction) and 0.0 < self.hadtopk_fraction <= 1.0,
               "codec.hadtopk_fraction", self.hadtopk_fraction, "must be in (0, 1]")
        _check(_is_int(self.hadtopk_chunk) and 1 <= self.hadtopk_chunk <= 65536
               and self.hadtopk_chunk & (self.hadtopk_chunk - 1) == 0, "codec.hadtopk_chunk", self.hadtopk_chunk,
               "must be a power of two in 1..65536")
        _bool("codec.error_feedback", self.error_feedback)
        _check(self.error_feedback or not self.rest_in_model, "codec.error_feedback", self.error_feedback,
               f"must be true with {self.name} (what a round does not send stays in the peer's parameters)")

    @property
    def outer_defaults(self) -> dict[str, float]:
        """The outer settings the codec was tuned with where they differ from the dense defaults (its
        ``CodecInfo.outer``, as ``{"lr": ..., "momentum": ...}``), else none: what an unset field takes."""
        from swarmloco.compression.registry import get_codec

        tuned = get_codec(self).info.outer
        return {} if tuned is None else {"lr": tuned[0], "momentum": tuned[1]}

    @property
    def rest_in_model(self) -> bool:
        """Whether the codec keeps a round's unsent rest in the peer's parameters (rotate, hadtopk): its
        ``CodecInfo.rest_in_model``."""
        from swarmloco.compression.registry import get_codec

        return get_codec(self).info.rest_in_model

    def check_outer(self, outer: OuterConfig) -> None:
        """The checks that need the outer settings: ``rotate`` and ``hadtopk`` keep the unsent rest in the model,
        which rounds that land behind the inner steps or sync one fragment at a time do not support (yet)."""
        if not self.rest_in_model:
            return
        _check(not outer.overlapped, "outer.overlap", outer.overlap,
               f'must be "none" with codec.name = "{self.name}" (the unsent rest is kept in the model when a '
               "round lands)")
        _check(outer.fragments == 1, "outer.fragments", outer.fragments, f'must be 1 with codec.name = "{self.name}"')


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
        _check(isinstance(self.owner, str) and (self.owner == "" or (len(self.owner) == 64 and all(
            c in "0123456789abcdef" for c in self.owner))), "access.owner", self.owner,
            "must be empty or an Ed25519 public key as 64 lowercase hex chars")
        _check(isinstance(self.private, bool), "access.private", self.private, "must be true or false")


@dataclass(frozen=True, kw_only=True)
class SwarmConfig:
    """Networking of this peer (local: not part of the manifest)."""

    initial_peers: tuple[str, ...] = ()
    """Multiaddrs of any live peers of the swarm; empty starts a new swarm."""
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    """Multiaddrs to listen on (port 0 picks a free one)."""
    announce_maddrs: tuple[str, ...] = ()
    """Public multiaddrs to announce instead of the listening ones (behind port forwarding)."""
    client_mode: bool = False
    """Behind NAT with no port forwarding: make only outgoing connections."""
    use_relay: bool = True
    """Let libp2p relays carry traffic to and from peers behind NAT."""
    use_auto_relay: bool = False
    """Find and use relays automatically (libp2p AutoRelay)."""
    min_peers: int = 1
    """Wait for at least this many ready peers before the first round (up to ready_timeout)."""
    ready_timeout: float = 30.0
    """Seconds to wait for the expected peers to be ready for a round before averaging with those that are."""
    max_group_size: int = 64
    """Largest all-reduce group."""
    matchmaking_time: float = 2.0
    """Seconds a group leader waits for followers after the ready barrier (a full group starts at once; a
    re-run waits 2x, 3x, up to 4x as long)."""
    request_timeout: float = 1.5
    """Seconds to wait for one matchmaking RPC (keep it below matchmaking_time, as hivemind asks)."""
    allreduce_timeout: float = 60.0
    """Whole all-reduce deadline, seconds."""
    next_chunk_timeout: float = 10.0
    """A peer that sends no chunk for this many seconds is dropped from the all-reduce."""
    heartbeat_period: float = 2.0
    """Seconds between progress heartbeats in the DHT."""
    heartbeat_ttl: float = 10.0
    """A peer whose last heartbeat is older than this is considered gone."""
    identity_path: str = ""
    """Ed25519 identity file; empty makes a fresh identity each start."""
    round_retries: int = 2
    """Times a failed round (a peer died mid-all-reduce) is re-run at once among the survivors."""
    retry_grace: float = 1.0
    """Seconds a re-run waits for round members that have not reported the failure yet."""
    state_timeout: float = 30.0
    """A peer serving its state that sends nothing for this many seconds is dropped for the next one."""
    download_sources: int = 4
    """A peer catching up downloads a shard of the state from each of up to this many peers at once."""
    exclude_rounds: int = 10
    """A peer that sent an invalid contribution (NaN/Inf, undecodable, wrong size or weight), whose update was
    clipped in two rounds in a row, or that alone timed out in two failed attempts in a row, is refused at
    matchmaking for this many outer steps. 0: never."""

    def __post_init__(self) -> None:
        from swarmloco.maddrs import maddr_problem

        for name, kind in (("initial_peers", "dial"), ("host_maddrs", "listen"), ("announce_maddrs", "")):
            value = getattr(self, name)
            _check(isinstance(value, tuple) and all(isinstance(v, str) for v in value), f"swarm.{name}", value,
                   "must be a list of multiaddr strings like \"/ip4/203.0.113.5/tcp/31337\"")
            for text in value:
                why = maddr_problem(text, listen=kind == "listen", dial=kind == "dial")
                _check(why is None, f"swarm.{name}", text, f"not a usable multiaddr: {why}")
        _check(len(self.host_maddrs) > 0 or self.client_mode, "swarm.host_maddrs", self.host_maddrs,
               "needs at least one address to listen on (or client_mode = true)")
        for name in ("client_mode", "use_relay", "use_auto_relay"):
            _bool(f"swarm.{name}", getattr(self, name))
        _check(isinstance(self.identity_path, str), "swarm.identity_path", self.identity_path, "must be a string")
        _check(_is_int(self.min_peers) and self.min_peers >= 1, "swarm.min_peers", self.min_peers,
               "must be an integer >= 1")
        _check(_is_int(self.max_group_size) and self.max_group_size >= 2, "swarm.max_group_size",
               self.max_group_size, "must be an integer >= 2")
        _check(_is_int(self.round_retries) and self.round_retries >= 0, "swarm.round_retries",
               self.round_retries, "must be an integer >= 0")
        _non_negative("swarm.retry_grace", self.retry_grace)
        _check(_is_int(self.exclude_rounds) and self.exclude_rounds >= 0, "swarm.exclude_rounds",
               self.exclude_rounds, "must be an integer >= 0")
        _check(_is_int(self.download_sources) and 1 <= self.download_sources <= 64, "swarm.download_sources",
               self.download_sources, "must be an integer from 1 to 64")
        for name in ("ready_timeout", "matchmaking_time", "request_timeout", "allreduce_timeout",
                     "next_chunk_timeout", "heartbeat_period", "heartbeat_ttl", "state_timeout"):
            _positive(f"swarm.{name}", getattr(self, name))
        _check(self.heartbeat_ttl > self.heartbeat_period, "swarm.heartbeat_ttl", self.heartbeat_ttl,
               "must exceed heartbeat_period")
        _check(self.allreduce_timeout > self.next_chunk_timeout, "swarm.allreduce_timeout",
               self.allreduce_timeout, "must exceed next_chunk_timeout")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Local checkpoints (atomic: temp file + rename)."""

    dir: str = ""
    """Directory for checkpoints; empty disables them."""
    every: int = 1
    """Write a checkpoint every this many outer steps (and on exit)."""
    keep: int = 2
    """Checkpoints kept on disk."""

    def __post_init__(self) -> None:
        _check(isinstance(self.dir, str), "checkpoint.dir", self.dir, "must be a string")
        _check(_is_int(self.every) and self.every >= 1, "checkpoint.every", self.every, "must be an integer >= 1")
        _check(_is_int(self.keep) and self.keep >= 1, "checkpoint.keep", self.keep, "must be an integer >= 1")


@dataclass(frozen=True, kw_only=True)
class StatusConfig:
    """The node's local status endpoint (JSON and Prometheus), bound to 127.0.0.1 only."""

    port: int = 0
    """TCP port on 127.0.0.1; 0 disables the endpoint."""

    def __post_init__(self) -> None:
        _check(_is_int(self.port) and 0 <= self.port < 65536, "status.port", self.port,
               "must be an integer from 0 (off) to 65535")


MANIFEST_SECTIONS = ("model", "data", "inner", "outer", "codec", "access")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one peer needs. See README.md for a commented example."""

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
        _check(isinstance(self.run_id, str) and self.run_id.replace("-", "").replace("_", "").isalnum()
               and len(self.run_id) <= 64, "run_id", self.run_id,
               "must be 1-64 letters, digits, '-' or '_'")
        _check(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "must be a non-negative integer")
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
