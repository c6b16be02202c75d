"""Data kinds built from a run config: token streams cut into disjoint shards and a held-out set.

``build_corpus`` returns an object with the interface of the byte ``Corpus``: ``train_batches(shard,
stream_seed)`` (an endless iterator of ``(x, y)`` int64 ``(batch_size, block_size)`` tensors, ``y`` being
``x`` shifted by one token), ``eval_batches()`` (a fixed list, identical on every peer), ``num_shards``
and ``vocab_size``.

* ``kind = "bytes"``: the bytes of text files (``data/text.py``);
* ``kind = "hf"``: a ``datasets`` dataset (``data/hf.py``), tokenized by a local or trained tokenizer
  (``data/tokenizer.py``), packed in memory (``data/packed.py``) or streamed (``data/streaming.py``).

``prepare_data`` resolves what the manifest must carry for every peer to prove it holds the same data
pipeline (the tokenizer's sha256); call it before hashing the manifest, and ``build_corpus`` after.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from swarmloco.config import DataConfig
from swarmloco.data.cache import default_cache_dir
from swarmloco.data.text import Corpus, shard_for_peer

__all__ = ["Corpus", "build_corpus", "prepare_data", "shard_for_peer"]


def prepare_data(cfg: DataConfig, *, cache_dir: Path | None = None) -> DataConfig:
    """``cfg`` with ``tokenizer_sha256`` filled in (kind "hf"; a trained tokenizer is trained or taken from the
    cache); a ValueError in one line if it is already set and this peer's tokenizer differs."""
    if cfg.kind == "bytes":
        return cfg
    from swarmloco.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg, default_cache_dir() if cache_dir is None else cache_dir)
    return dataclasses.replace(cfg, tokenizer_sha256=tok.sha256)


def build_corpus(cfg: DataConfig, block_size: int, seed: int, *, cache_dir: Path | None = None):
    """The run's corpus (``Corpus``, ``PackedCorpus`` or ``StreamingCorpus``), after ``prepare_data``."""
    if cfg.kind == "bytes":
        return Corpus(cfg, block_size, seed)
    if not cfg.tokenizer_sha256:
        raise ValueError("data.tokenizer_sha256='': a kind = \"hf\" corpus needs the tokenizer's hash; "
                         "prepare_data(cfg) fills it in (it belongs in the run manifest)")
    from swarmloco.data.hf import iter_texts
    from swarmloco.data.packed import PackedCorpus, corpus_tokens
    from swarmloco.data.streaming import StreamingCorpus
    from swarmloco.data.tokenizer import load_tokenizer

    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    tok = load_tokenizer(cfg, cache_dir)
    if cfg.streaming:
        return StreamingCorpus(cfg, block_size, seed, tok, lambda: iter_texts(cfg))
    return PackedCorpus(cfg, block_size, seed, corpus_tokens(cfg, tok, cache_dir), tok.vocab_size)
