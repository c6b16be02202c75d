"""Hugging Face data kind: a tokenizer proven by its hash, sequences packed into disjoint deterministic shards,
the same held-out set on every peer, streamed datasets sharded by example index, one-line refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from swarmloco.config import DataConfig, RunConfig, config_from_dict
from swarmloco.data import build_corpus, cache, prepare_data
from swarmloco.data.packed import PackedCorpus
from swarmloco.data.streaming import StreamingCorpus
from swarmloco.protocol.manifest import RunManifest, diff_fields

STDLIB_JSON = str(Path(sysconfig.get_paths()["stdlib"]) / "json")  # ~50 KB of text in 5 files
BLOCK = 16


def text_cfg(**overrides) -> DataConfig:
    return DataConfig(**{"kind": "hf", "path": STDLIB_JSON, "tokenizer_vocab_size": 320, "num_shards": 3,
                         "batch_size": 4, "eval_batches": 3, "holdout_fraction": 0.05, **overrides})


def one_line_error(call, *match: str) -> str:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for part in match:
        assert part in message, message
    return message


def rows_of(batches) -> set[tuple[int, ...]]:
    return {tuple(torch.cat([x[i], y[i, -1:]]).tolist()) for x, y in batches for i in range(x.shape[0])}


@pytest.fixture
def prepared(tmp_path: Path) -> tuple[DataConfig, Path]:
    cache = tmp_path / "cache"
    return prepare_data(text_cfg(), cache_dir=cache), cache


def test_trained_tokenizer_is_pinned_cached_and_reused(prepared, tmp_path: Path) -> None:
    cfg, cache = prepared
    entries = list((cache / "tokenizers").iterdir())
    assert [p.suffix for p in entries] == [".json"]  # one entry, no temporary file left behind
    assert hashlib.sha256(entries[0].read_bytes()).hexdigest() == cfg.tokenizer_sha256
    assert prepare_data(cfg, cache_dir=cache) == cfg  # a set hash is checked, not replaced
    assert prepare_data(text_cfg(), cache_dir=tmp_path / "elsewhere") == cfg  # retrained alike
    one_line_error(lambda: prepare_data(dataclasses.replace(cfg, tokenizer_sha256="0" * 64), cache_dir=cache),
                   "data.tokenizer_sha256=0000", "the tokenizer trained here has sha256")


def test_a_different_tokenizer_is_a_different_manifest_field(prepared, tmp_path: Path) -> None:
    cfg, cache = prepared
    other = prepare_data(text_cfg(tokenizer_vocab_size=300), cache_dir=cache)
    mine, theirs = RunConfig(data=cfg), RunConfig(data=other)
    differing = diff_fields(RunManifest.from_config(mine).data, RunManifest.from_config(theirs).data)
    assert [d.split(" ")[0] for d in differing] == ["data.tokenizer_sha256", "data.tokenizer_vocab_size"]


def test_local_tokenizer_directory_is_hashed_and_checked(prepared, tmp_path: Path) -> None:
    trained, cache = prepared
    (tmp_path / "tok").mkdir()
    file = tmp_path / "tok" / "tokenizer.json"
    file.write_bytes(next((cache / "tokenizers").iterdir()).read_bytes())
    cfg = prepare_data(text_cfg(tokenizer=str(tmp_path / "tok")), cache_dir=None)
    assert cfg.tokenizer_sha256 == hashlib.sha256(file.read_bytes()).hexdigest() == trained.tokenizer_sha256
    one_line_error(lambda: prepare_data(text_cfg(tokenizer=str(tmp_path)), cache_dir=None),
                   "data.tokenizer=", "tokenizer.json")
    one_line_error(lambda: prepare_data(text_cfg(tokenizer=str(tmp_path / "tok"), eos_token="</s>"), cache_dir=None),
                   "data.eos_token='</s>'")


def test_packed_shards_are_disjoint_every_row_once_per_epoch_and_apart_from_the_held_out_rows() -> None:
    tokens = torch.arange(40 * (BLOCK + 1) + 5, dtype=torch.int32)  # 40 distinct rows (and a cut-off tail)
    corpus = PackedCorpus(text_cfg(), BLOCK, seed=5, tokens=tokens, vocab_size=tokens.numel())
    assert corpus.rows.shape == (40, BLOCK + 1) and corpus.n_holdout == 4 and corpus.shard_len == 12
    held_out = rows_of(corpus.eval_batches())
    assert held_out == {tuple(r.tolist()) for r in corpus.rows[36:]}
    per_shard = []
    for shard in range(3):
        lo, hi = corpus.shard_bounds(shard)
        it = corpus.train_batches(shard, stream_seed=1)
        epoch = rows_of(next(it) for _ in range((hi - lo) // 4))
        assert epoch == {tuple(r.tolist()) for r in corpus.rows[lo:hi]}  # every row of the shard, once
        per_shard.append(epoch)
    assert sum(map(len, per_shard)) == len(set().union(*per_shard)) == 36 and not held_out & set().union(*per_shard)


def test_built_corpus_batches_are_packed_sequences_fixed_by_seed_shard_and_stream(prepared) -> None:
    cfg, cache = prepared
    corpus = build_corpus(cfg, BLOCK, seed=5, cache_dir=cache)
    assert isinstance(corpus, PackedCorpus) and corpus.num_shards == 3 and corpus.vocab_size == 320
    x, y = next(corpus.train_batches(0))
    assert x.shape == y.shape == (4, BLOCK) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    again = build_corpus(cfg, BLOCK, seed=5, cache_dir=cache)
    a, b = corpus.train_batches(2, stream_seed=9), again.train_batches(2, stream_seed=9)
    assert all(torch.equal(next(a)[0], next(b)[0]) for _ in range(5))
    assert not torch.equal(next(corpus.train_batches(2, 9))[0], next(corpus.train_batches(2, 10))[0])
    assert not torch.equal(next(corpus.train_batches(1, 9))[0], next(corpus.train_batches(2, 9))[0])


def test_held_out_set_is_identical_on_every_peer(prepared, tmp_path: Path) -> None:
    cfg, cache = prepared
    mine = build_corpus(cfg, BLOCK, seed=0, cache_dir=cache).eval_batches()
    # another peer: its own cache, so it trains the tokenizer and tokenizes the text itself
    theirs = build_corpus(cfg, BLOCK, seed=0, cache_dir=tmp_path / "peer2").eval_batches()
    assert len(mine) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(mine, theirs))


def test_build_corpus_needs_the_tokenizer_hash_from_prepare_data() -> None:
    one_line_error(lambda: build_corpus(text_cfg(), BLOCK, 0, cache_dir=None), "data.tokenizer_sha256=''",
                   "prepare_data")


def write_jsonl(folder: Path, n: int, field: str = "text") -> None:
    folder.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    for part in range(2):
        with open(folder / f"part{part}.jsonl", "w") as f:
            for i in range(part * n // 2, (part + 1) * n // 2):
                text = f"example {i}: " + " ".join(words[(i * k) % len(words)] for k in range(1, 40))
                f.write(json.dumps({field: text, "id": i}) + "\n")


def test_streamed_dataset_is_sharded_by_example_index_with_a_shared_held_out_head(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "docs", 60)
    cfg = DataConfig(kind="hf", dataset="json", path=str(tmp_path / "docs"), streaming=True, num_shards=4,
                     batch_size=2, eval_batches=2, tokenizer_vocab_size=300)
    cfg = prepare_data(cfg, cache_dir=tmp_path / "cache")
    corpus = build_corpus(cfg, BLOCK, seed=0, cache_dir=tmp_path / "cache")
    assert isinstance(corpus, StreamingCorpus) and corpus.vocab_size == 300
    k = corpus.holdout_examples
    assert 0 < k < 10
    for shard in range(4):
        ids = [int(text.split(":")[0].split()[1]) for text in corpus.shard_examples(shard)]
        assert ids == [i for i in range(k, 60) if (i - k) % 4 == shard]
    again = build_corpus(cfg, BLOCK, seed=0, cache_dir=tmp_path / "other")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(corpus.eval_batches(), again.eval_batches()))
    a, b = corpus.train_batches(1), again.train_batches(1)
    batches = [next(a) for _ in range(30)]  # more than one epoch of the shard
    assert all(torch.equal(x, next(b)[0]) for x, _ in batches)
    assert all(torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (2, BLOCK) for x, y in batches)


def test_parquet_builder_reads_the_named_text_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i} " + "lorem ipsum dolor sit amet " * 20 for i in range(40)]
    pq.write_table(pa.table({"content": texts, "n": list(range(40))}), tmp_path / "data.parquet")
    base = dict(kind="hf", dataset="parquet", path=str(tmp_path / "data.parquet"), tokenizer_vocab_size=260,
                num_shards=2, batch_size=2, eval_batches=1)
    one_line_error(lambda: prepare_data(DataConfig(**base), cache_dir=None), "data.text_field='text'", "content")
    cfg = prepare_data(DataConfig(**base, text_field="content"), cache_dir=None)
    corpus = build_corpus(cfg, BLOCK, seed=0, cache_dir=None)
    assert corpus.vocab_size == 260 and next(corpus.train_batches(1))[0].shape == (2, BLOCK)


def test_hub_dataset_on_an_offline_machine_is_one_line_naming_the_field(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(kind="hf", dataset="no-such-org/no-such-dataset", streaming=True)
    one_line_error(lambda: prepare_data(cfg, cache_dir=None), "data.dataset='no-such-org/no-such-dataset'", "offline")


@pytest.mark.parametrize("data, field", [
    ({"kind": "tokens"}, "data.kind"),
    ({"kind": "hf", "dataset": "org/ds"}, "data.streaming"),
    ({"kind": "hf", "dataset": "org/ds", "streaming": True, "path": "x"}, "data.path"),
    ({"tokenizer": "dir"}, "data.tokenizer"),
    ({"kind": "hf", "tokenizer_vocab_size": 100}, "data.tokenizer_vocab_size"),
    ({"kind": "hf", "tokenizer_sha256": "xyz"}, "data.tokenizer_sha256"),
    ({"kind": "hf", "text_field": ""}, "data.text_field"),
])
def test_data_config_fields_are_validated_at_load(data, field) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config_from_dict({"data": data})


def test_missing_local_files_are_one_line_naming_the_path(tmp_path: Path) -> None:
    cfg = DataConfig(kind="hf", dataset="json", path=str(tmp_path / "nothing"))
    one_line_error(lambda: prepare_data(cfg, cache_dir=None), "data.path=", "no such file or directory")
    (tmp_path / "empty").mkdir()
    cfg = DataConfig(kind="hf", dataset="parquet", path=str(tmp_path / "empty"))
    one_line_error(lambda: prepare_data(cfg, cache_dir=None), "data.path=", "no files for the parquet builder")


def test_peers_sharing_a_cache_compute_an_entry_once(tmp_path: Path) -> None:
    calls = []

    def compute() -> bytes:
        calls.append(1)
        time.sleep(0.3)
        return b"entry"

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: cache.computed(tmp_path, "kind", "k" * 64, ".bin", compute), range(3)))
    assert results == [b"entry"] * 3 and len(calls) == 1
    assert [p.name for p in (tmp_path / "kind").iterdir()] == ["k" * 64 + ".bin"]


def test_byte_corpus_is_one_kind_among_others() -> None:
    cfg = DataConfig(max_bytes=200_000, num_shards=4)
    assert prepare_data(cfg) is cfg
    corpus = build_corpus(cfg, BLOCK, 0)
    assert corpus.vocab_size == 256 and corpus.num_shards == 4
