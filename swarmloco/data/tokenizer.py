"""The run's tokenizer: a local ``tokenizer.json``, or a byte-level BPE trained reproducibly on the run's data.

Every peer must tokenize alike, so the manifest pins the sha256 of the ``tokenizer.json`` bytes
(``data.tokenizer_sha256``). A trained tokenizer is trained by each peer itself on the first
``data.tokenizer_train_bytes`` of the run's training text with the ``tokenizers`` BPE trainer: byte-level
(GPT-2's pre-tokenizer and alphabet, so no text is unknown), the eos token its only special token. That
training is deterministic (same text and ``tokenizers`` version: the same bytes, whatever the process, hash
seed or thread count), so the peers hold the very same file and prove it by its hash. Trained tokenizers are
cached on disk, keyed by a hash of everything they are trained from.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmloco.config import DataConfig
from swarmloco.data import cache
from swarmloco.data.hf import iter_texts, take_bytes

logger = logging.getLogger(__name__)

RECIPE = "bytelevel-bpe-1"
"""Bump when the training recipe changes: it keys the cache."""


@dataclass(frozen=True)
class RunTokenizer:
    """A loaded tokenizer and what identifies it."""

    tokenizer: Any  # tokenizers.Tokenizer
    sha256: str
    eos_id: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text followed by the eos token."""
        return [enc.ids + [self.eos_id] for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


def train_bpe(texts: list[str], vocab_size: int, eos_token: str) -> bytes:
    """Train a byte-level BPE tokenizer; its ``tokenizer.json`` bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[eos_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str().encode("utf-8")


def training_texts(cfg: DataConfig) -> list[str]:
    """What a trained tokenizer learns from: the first ``tokenizer_train_bytes`` of the run's text."""
    return take_bytes(iter_texts(cfg), cfg.tokenizer_train_bytes)


def texts_sha256(texts: list[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def tokenizer_json(cfg: DataConfig, cache_dir: Path | None) -> bytes:
    """The run's ``tokenizer.json`` bytes: read from ``data.tokenizer``, else trained (or taken from the cache)."""
    if cfg.tokenizer:
        path = Path(cfg.tokenizer).expanduser() / "tokenizer.json"
        try:
            return path.read_bytes()
        except OSError as e:
            raise ValueError(f"data.tokenizer={cfg.tokenizer!r}: cannot read {path} ({e.strerror or e}); a local "
                             "tokenizer directory holds a tokenizer.json (a fast tokenizer)") from None
    import tokenizers

    texts = training_texts(cfg)
    key = cache.cache_key(recipe=RECIPE, tokenizers=tokenizers.__version__, vocab_size=cfg.tokenizer_vocab_size,
                          eos=cfg.eos_token, texts=texts_sha256(texts))

    def train() -> bytes:
        logger.info("training a %d-token BPE tokenizer on %d bytes of the run's text", cfg.tokenizer_vocab_size,
                    sum(len(t.encode()) for t in texts))
        return train_bpe(texts, cfg.tokenizer_vocab_size, cfg.eos_token)

    return cache.computed(cache_dir, "tokenizers", key, ".json", train)


def load_tokenizer(cfg: DataConfig, cache_dir: Path | None) -> RunTokenizer:
    """The run's tokenizer, checked against ``data.tokenizer_sha256`` when that is set (one-line ValueError)."""
    from tokenizers import Tokenizer

    data = tokenizer_json(cfg, cache_dir)
    digest = hashlib.sha256(data).hexdigest()
    if cfg.tokenizer_sha256 and digest != cfg.tokenizer_sha256:
        where = f"the tokenizer in {cfg.tokenizer!r}" if cfg.tokenizer else "the tokenizer trained here"
        raise ValueError(f"data.tokenizer_sha256={cfg.tokenizer_sha256[:16]}...: {where} has sha256 {digest[:16]}... "
                         "(other data, tokenizer files or tokenizers version than the run's)")
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - a malformed tokenizer.json
        raise ValueError(f"data.tokenizer={cfg.tokenizer!r}: not a valid tokenizer.json: {e}") from None
    eos_id = tok.token_to_id(cfg.eos_token)
    if eos_id is None:
        raise ValueError(f"data.eos_token={cfg.eos_token!r} is not in the tokenizer's vocabulary")
    return RunTokenizer(tok, digest, eos_id)
