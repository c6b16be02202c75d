"""A tokenized corpus packed into fixed-length sequences, a held-out tail and disjoint contiguous shards.

The examples' tokens (each followed by the eos token) are concatenated and cut into rows of
``block_size + 1`` tokens; a row gives one sequence ``x = row[:-1]``, ``y = row[1:]``::

    [ shard 0 rows | shard 1 rows | ... | shard num_shards-1 rows | held-out rows (holdout_fraction) ]

A peer's training batches walk its shard's rows in a fresh seeded permutation each epoch (every row
once per epoch); the held-out batches are the first held-out rows, identical on every peer. The
tokens of a corpus are cached on disk, keyed by the text and the tokenizer's hash.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from swarmloco.config import DataConfig
from swarmloco.data import cache
from swarmloco.data.hf import iter_texts, take_bytes
from swarmloco.data.tokenizer import RunTokenizer, texts_sha256

logger = logging.getLogger(__name__)

ENCODE_CHUNK = 64
"""Examples per ``encode_batch`` call."""


def stream_seed_of(*parts: int) -> int:
    """A 63-bit generator seed from integers (stable across processes, unlike ``hash`` of a str)."""
    digest = hashlib.sha256(b",".join(str(p).encode() for p in parts)).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def tokenize_texts(texts: list[str], tok: RunTokenizer) -> torch.Tensor:
    """Every text's token ids and an eos after each, as one int32 tensor."""
    parts = [np.asarray(ids, dtype=np.int32) for i in range(0, len(texts), ENCODE_CHUNK)
             for ids in tok.encode(texts[i:i + ENCODE_CHUNK])]
    return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32))


def corpus_tokens(cfg: DataConfig, tok: RunTokenizer, cache_dir: Path | None) -> torch.Tensor:
    """The run's text (the first ``max_bytes``) tokenized, from the cache when it was tokenized before."""
    texts = take_bytes(iter_texts(cfg), cfg.max_bytes)
    key = cache.cache_key(tokenizer=tok.sha256, texts=texts_sha256(texts))
    data = cache.computed(cache_dir, "tokens", key, ".i32",
                          lambda: tokenize_texts(texts, tok).numpy().astype("<i4").tobytes())
    tokens = np.frombuffer(data[: len(data) - len(data) % 4], dtype="<i4").astype(np.int32)
    if tokens.size and not (tokens.min() >= 0 and tokens.max() < tok.vocab_size):
        raise ValueError(f"data: the cached tokens of this corpus hold ids outside the vocabulary; delete "
                         f"{cache_dir / 'tokens' if cache_dir else 'the cache'} and retry")
    return torch.from_numpy(tokens)


class PackedCorpus:
    """Training shards and held-out batches over packed rows of one token stream."""

    def __init__(self, cfg: DataConfig, block_size: int, seed: int, tokens: torch.Tensor, vocab_size: int):
        self.cfg, self.block_size, self.seed, self.vocab_size = cfg, block_size, seed, vocab_size
        n_rows = tokens.numel() // (block_size + 1)
        self.rows = tokens[: n_rows * (block_size + 1)].view(n_rows, block_size + 1)
        self.n_holdout = max(cfg.batch_size, math.ceil(n_rows * cfg.holdout_fraction))
        self.shard_len = (n_rows - self.n_holdout) // cfg.num_shards
        if self.shard_len < 1:
            raise ValueError(f"data: {tokens.numel()} tokens make {n_rows} sequences of block_size {block_size}: too "
                             f"few for {self.n_holdout} held out and {cfg.num_shards} shards (raise data.max_bytes, "
                             "lower data.num_shards)")

    @property
    def num_shards(self) -> int:
        return self.cfg.num_shards

    @property
    def holdout_start(self) -> int:
        """Index of the first held-out row."""
        return self.rows.shape[0] - self.n_holdout

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """The rows ``[lo, hi)`` of one shard."""
        if not 0 <= shard < self.cfg.num_shards:
            raise ValueError(f"shard {shard} is out of range [0, {self.cfg.num_shards})")
        return shard * self.shard_len, (shard + 1) * self.shard_len

    def _batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = self.rows[index].long()
        return seqs[:, :-1], seqs[:, 1:]

    def train_batches(self, shard: int, stream_seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An endless iterator of (inputs, targets) from one shard, each row once per epoch."""
        lo, hi = self.shard_bounds(shard)
        gen = torch.Generator().manual_seed(stream_seed_of(self.seed, shard, stream_seed))
        pending = torch.zeros(0, dtype=torch.long)
        while True:
            while pending.numel() < self.cfg.batch_size:
                pending = torch.cat([pending, lo + torch.randperm(hi - lo, generator=gen)])
            index, pending = pending[: self.cfg.batch_size], pending[self.cfg.batch_size:]
            yield self._batch(index)

    def eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed held-out batches (identical on every peer; cycling if the tail is short)."""
        b = self.cfg.batch_size
        return [self._batch(self.holdout_start + (torch.arange(i * b, (i + 1) * b) % self.n_holdout))
                for i in range(self.cfg.eval_batches)]
