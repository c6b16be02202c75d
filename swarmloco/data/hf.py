"""Text from a Hugging Face ``datasets`` dataset: local files through the text / json / parquet builders,
or a hub dataset, streamed.

Every peer sees the examples in the same order: local files sorted by their path relative to
``data.path`` (an empty path: the Python standard library's sources, as for the byte corpus), a hub
dataset in its own order. Local files are read through ``datasets``' streaming mode too: lazily, and
without writing an Arrow cache. ``datasets`` is imported only here, and only when a run uses it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from swarmloco.config import LOCAL_DATASET_BUILDERS, DataConfig
from swarmloco.data.text import corpus_files
from swarmloco.hub import hub_offline, offline_error, one_line

BUILDER_SUFFIXES = {"json": (".json", ".jsonl"), "parquet": (".parquet",)}


def source_files(cfg: DataConfig) -> list[str]:
    """The local files a builder reads, in a fixed order (ValueError naming data.path if there are none)."""
    if cfg.dataset == "text":
        files = corpus_files(cfg.path)
    else:
        if cfg.path == "":
            raise ValueError(f"data.path='': the {cfg.dataset} builder needs a file or a directory of files")
        root = Path(cfg.path).expanduser()
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix in BUILDER_SUFFIXES[cfg.dataset]),
                           key=lambda p: p.relative_to(root).as_posix())
        else:
            raise ValueError(f"data.path={cfg.path!r}: no such file or directory")
    if not files:
        raise ValueError(f"data.path={cfg.path!r}: no files for the {cfg.dataset} builder")
    return [str(f) for f in files]


def open_examples(cfg: DataConfig) -> Any:
    """The dataset as a ``datasets.IterableDataset`` (one-line ValueError if it cannot be opened)."""
    if cfg.dataset not in LOCAL_DATASET_BUILDERS and hub_offline():
        raise offline_error("data.dataset", cfg.dataset, "dataset")
    import datasets

    datasets.logging.disable_progress_bar()
    try:
        if cfg.dataset == "text":
            return datasets.load_dataset("text", data_files=source_files(cfg), split=cfg.split, streaming=True,
                                         sample_by="document", encoding_errors="replace")
        if cfg.dataset in LOCAL_DATASET_BUILDERS:
            return datasets.load_dataset(cfg.dataset, data_files=source_files(cfg), split=cfg.split, streaming=True)
        return datasets.load_dataset(cfg.dataset, cfg.subset or None, split=cfg.split, streaming=True)
    except ValueError as e:
        if str(e).startswith("data."):
            raise
        raise ValueError(f"data.dataset={cfg.dataset!r}: cannot open it: {one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - network, file format and hub errors of every kind
        raise ValueError(f"data.dataset={cfg.dataset!r}: cannot open it: {one_line(e)}") from None


def iter_texts(cfg: DataConfig) -> Iterator[str]:
    """Every example's text, in the dataset's order."""
    for i, example in enumerate(open_examples(cfg)):
        if cfg.text_field not in example:
            raise ValueError(f"data.text_field={cfg.text_field!r}: example {i} has no such column "
                             f"(it has: {', '.join(sorted(example))})")
        text = example[cfg.text_field]
        if not isinstance(text, str):
            raise ValueError(f"data.text_field={cfg.text_field!r}: example {i} holds a {type(text).__name__}, "
                             "not text")
        yield text


def take_bytes(texts: Iterable[str], limit: int) -> list[str]:
    """The first texts holding ``limit`` UTF-8 bytes in all (the last one cut at a character boundary)."""
    out, total = [], 0
    for text in texts:
        data = text.encode("utf-8")
        if total + len(data) >= limit:
            out.append(data[: limit - total].decode("utf-8", "ignore"))
            break
        out.append(text)
        total += len(data)
    return out
