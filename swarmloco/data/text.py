"""Byte-level text corpus: a held-out tail and disjoint contiguous training shards.

Layout of the token stream (files in sorted path order, concatenated, capped at ``max_bytes``)::

    [ shard 0 | shard 1 | ... | shard num_shards-1 | held-out tail (holdout_fraction) ]

A peer trains on one shard (``--shard K``; without it, the shard is derived from its peer id).
Batches are random windows inside the shard drawn from a generator seeded by (seed, shard, peer),
and the held-out batches are fixed by the run seed alone, so every peer evaluates the same ones.
"""

from __future__ import annotations

import hashlib
import logging
import sysconfig
from pathlib import Path

import torch

from swarmloco.config import DataConfig

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".toml", ".cfg", ".ini", ".html", ".c", ".h"}


def stdlib_source_dir() -> Path:
    """The Python standard library's own source directory: a real corpus on every machine."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(path: str) -> list[Path]:
    """The files of a corpus, in a deterministic order."""
    if path == "":
        root = stdlib_source_dir()
        skip = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
        return sorted(
            (p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)),
            key=lambda p: p.relative_to(root).as_posix(),
        )
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES),
                       key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise ValueError(f"data.path = {path!r}: no text files ({' '.join(sorted(TEXT_SUFFIXES))}) in that "
                             "directory")
        return files
    raise ValueError(f"data.path = {path!r}: no such file or directory")


def _binary_at(data: bytes) -> int:
    """Offset of the first NUL byte (text has none; images, archives and executables do), or -1."""
    return data.find(b"\0")


def load_corpus(cfg: DataConfig) -> torch.Tensor:
    """Read the corpus as a 1-D uint8 tensor of byte tokens. A file named by ``data.path`` must be text
    (ValueError otherwise); binary or unreadable files inside a ``data.path`` directory are skipped."""
    chunks, total, skipped = [], 0, []
    files = corpus_files(cfg.path)
    explicit = cfg.path != "" and len(files) == 1 and Path(cfg.path).expanduser().is_file()
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            if explicit:
                raise ValueError(f"data.path = {cfg.path!r}: cannot read it ({e.strerror or e})") from None
            skipped.append(f"{f.name} (unreadable)")
            continue
        data = data[: cfg.max_bytes - total]
        if (at := _binary_at(data)) >= 0:
            if explicit:
                raise ValueError(f"data.path = {cfg.path!r}: not a text file (a NUL byte at offset {at}); give a "
                                 "text file or a directory of them")
            skipped.append(f"{f.name} (binary)")
            continue
        chunks.append(data)
        total += len(data)
        if total >= cfg.max_bytes:
            break
    if skipped:
        logger.warning("skipped %d corpus file(s) under %s: %s", len(skipped), cfg.path, ", ".join(skipped[:5])
                       + (" ..." if len(skipped) > 5 else ""))
    blob = b"".join(chunks)
    if len(blob) < 10_000:
        raise ValueError(f"data.path = {cfg.path!r}: corpus too small ({len(blob)} bytes of text, need >= 10000)")
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def shard_for_peer(peer_id: str, num_shards: int) -> int:
    """Deterministic shard of a peer that was not given one explicitly."""
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:8], "big") % num_shards


class Corpus:
    """Train shards and held-out batches over one tokenized corpus."""

    def __init__(self, cfg: DataConfig, block_size: int, seed: int, tokens: torch.Tensor | None = None):
        self.cfg, self.block_size, self.seed = cfg, block_size, seed
        self.tokens = load_corpus(cfg) if tokens is None else tokens
        n = self.tokens.numel()
        self.holdout_start = int(n * (1 - cfg.holdout_fraction))
        self.shard_len = self.holdout_start // cfg.num_shards
        if self.shard_len <= block_size + 1 or n - self.holdout_start <= block_size + 1:
            raise ValueError(
                f"data: a corpus of {n} bytes is too small for data.num_shards = {cfg.num_shards} shards of "
                f"model.block_size = {block_size} tokens (lower num_shards, or add data)"
            )

    @property
    def num_shards(self) -> int:
        return self.cfg.num_shards

    @property
    def vocab_size(self) -> int:
        """Byte tokens."""
        return 256

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        if not 0 <= shard < self.cfg.num_shards:
            raise ValueError(f"shard {shard} is out of range [0, {self.cfg.num_shards})")
        start = shard * self.shard_len
        return start, start + self.shard_len

    def _windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.arange(self.block_size + 1)
        seqs = self.tokens[starts[:, None] + offsets[None, :]].long()
        return seqs[:, :-1], seqs[:, 1:]

    def train_batches(self, shard: int, stream_seed: int = 0):
        """An endless iterator of (inputs, targets) from one shard."""
        lo, hi = self.shard_bounds(shard)
        gen = torch.Generator().manual_seed(hash((self.seed, shard, stream_seed)) & 0x7FFF_FFFF_FFFF)
        while True:
            starts = torch.randint(lo, hi - self.block_size - 1, (self.cfg.batch_size,), generator=gen)
            yield self._windows(starts)

    def eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed held-out batches (identical on every peer of the run)."""
        gen = torch.Generator().manual_seed(self.seed + 1_000_003)
        hi = self.tokens.numel() - self.block_size - 1
        return [
            self._windows(torch.randint(self.holdout_start, hi, (self.cfg.batch_size,), generator=gen))
            for _ in range(self.cfg.eval_batches)
        ]
