"""A streamed dataset (``data.streaming = true``), tokenized and packed on the fly.

The stream's length is unknown, so the held-out set is its head: the first examples, packed into
rows of ``block_size + 1`` tokens until ``eval_batches * batch_size`` rows are filled (every peer
reads the same head, so every peer holds the same held-out set). The training examples are the
ones after it, dealt to the shards by index: example ``K + i`` belongs to shard ``i mod num_shards``
(deterministic and disjoint; each peer reads the stream and keeps its own examples). A shard's
rows pass through a seeded shuffle buffer; at the end of the stream the next epoch starts over
with another seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from swarmloco.config import DataConfig
from swarmloco.data.packed import ENCODE_CHUNK, stream_seed_of
from swarmloco.data.tokenizer import RunTokenizer

SHUFFLE_ROWS = 256
"""Rows a shard's shuffle buffer holds."""


class _Packer:
    """Cuts a stream of token ids into rows of a fixed length."""

    def __init__(self, row_len: int):
        self.row_len, self.buffer = row_len, []

    def add(self, ids: list[int]) -> list[list[int]]:
        self.buffer.extend(ids)
        rows = [self.buffer[i:i + self.row_len] for i in range(0, len(self.buffer) - self.row_len + 1, self.row_len)]
        del self.buffer[: len(rows) * self.row_len]
        return rows


def _as_batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = torch.tensor(rows, dtype=torch.long)
    return seqs[:, :-1], seqs[:, 1:]


class StreamingCorpus:
    """Held-out head and index-sharded training examples of a stream of texts."""

    def __init__(self, cfg: DataConfig, block_size: int, seed: int, tok: RunTokenizer,
                 texts: Callable[[], Iterable[str]]):
        self.cfg, self.block_size, self.seed, self.tok, self._texts = cfg, block_size, seed, tok, texts
        self.vocab_size = tok.vocab_size
        self._eval_rows, self.holdout_examples = self._read_head()

    @property
    def num_shards(self) -> int:
        return self.cfg.num_shards

    def _read_head(self) -> tuple[list[list[int]], int]:
        want, packer, rows, used = self.cfg.eval_batches * self.cfg.batch_size, _Packer(self.block_size + 1), [], 0
        for text in self._texts():
            used += 1
            rows.extend(packer.add(self.tok.encode([text])[0]))
            if len(rows) >= want:
                return rows[:want], used
        raise ValueError(f"data: the stream ends after {used} examples, too few for {want} held-out sequences of "
                         f"block_size {self.block_size} (lower data.eval_batches or data.batch_size)")

    def shard_examples(self, shard: int) -> Iterator[str]:
        """One pass over a shard's examples, in stream order."""
        if not 0 <= shard < self.cfg.num_shards:
            raise ValueError(f"shard {shard} is out of range [0, {self.cfg.num_shards})")
        for i, text in enumerate(self._texts()):
            if i >= self.holdout_examples and (i - self.holdout_examples) % self.cfg.num_shards == shard:
                yield text

    def _shard_rows(self, shard: int) -> Iterator[list[int]]:
        packer, chunk = _Packer(self.block_size + 1), []
        for text in self.shard_examples(shard):
            chunk.append(text)
            if len(chunk) == ENCODE_CHUNK:
                for ids in self.tok.encode(chunk):
                    yield from packer.add(ids)
                chunk = []
        for ids in self.tok.encode(chunk) if chunk else []:
            yield from packer.add(ids)

    def train_batches(self, shard: int, stream_seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An endless iterator of (inputs, targets) from one shard's examples."""
        batch, epoch = [], 0
        while True:
            gen = torch.Generator().manual_seed(stream_seed_of(self.seed, shard, stream_seed, epoch))
            buffer, produced = [], 0
            for row in self._shard_rows(shard):
                produced += 1
                buffer.append(row)
                if len(buffer) < SHUFFLE_ROWS:
                    continue
                batch.append(buffer.pop(int(torch.randint(len(buffer), (1,), generator=gen))))
                if len(batch) == self.cfg.batch_size:
                    yield _as_batch(batch)
                    batch = []
            if produced == 0:
                raise ValueError(f"data: shard {shard} of the stream holds no sequence of block_size "
                                 f"{self.block_size} (too few examples for data.num_shards={self.cfg.num_shards})")
            while buffer:
                batch.append(buffer.pop(int(torch.randint(len(buffer), (1,), generator=gen))))
                if len(batch) == self.cfg.batch_size:
                    yield _as_batch(batch)
                    batch = []
            epoch += 1

    def eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out batches: the stream's head (identical on every peer)."""
        b = self.cfg.batch_size
        return [_as_batch(self._eval_rows[i * b:(i + 1) * b]) for i in range(self.cfg.eval_batches)]
