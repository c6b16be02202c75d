"""An on-disk cache of derived data (trained tokenizers, tokenized corpora), keyed by a hash of its inputs.

An entry is whole or absent: it is written to a temporary file in the same directory, then renamed.
Peers sharing a machine (the demo) compute an entry once: ``computed`` holds a lock file while it
computes, and the others wait, then read the entry. What is read is checked by its user as if it had
just been computed (a trained tokenizer's sha256 against the manifest; token ids against the vocabulary).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_ENV = "SWARMLOCO_CACHE"


def default_cache_dir() -> Path:
    """``$SWARMLOCO_CACHE``, else ``$XDG_CACHE_HOME/swarmloco``, else ``~/.cache/swarmloco``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "swarmloco"


def cache_key(**inputs: Any) -> str:
    """sha256 of the inputs (JSON, keys sorted): the name of a cache entry."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_entry(cache_dir: Path | None, kind: str, key: str, suffix: str) -> bytes | None:
    """The cached bytes, or None if absent, unreadable or the cache is off (``cache_dir`` None)."""
    if cache_dir is None:
        return None
    try:
        return (cache_dir / kind / f"{key}{suffix}").read_bytes()
    except OSError:
        return None


def write_entry(cache_dir: Path | None, kind: str, key: str, suffix: str, data: bytes) -> None:
    """Store ``data`` atomically; a cache that cannot be written is logged and skipped."""
    if cache_dir is None:
        return
    folder = cache_dir / kind
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / f"{key}{suffix}")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        logger.warning("cannot write the cache entry %s/%s%s: %s", folder, key, suffix, e)


def computed(cache_dir: Path | None, kind: str, key: str, suffix: str, compute: Callable[[], bytes]) -> bytes:
    """The cached entry, else ``compute()`` stored as it; one process at a time computes a given entry."""
    hit = read_entry(cache_dir, kind, key, suffix)
    if hit is not None or cache_dir is None:
        return hit if hit is not None else compute()
    try:
        (cache_dir / "locks").mkdir(parents=True, exist_ok=True)
        lock = open(cache_dir / "locks" / f"{kind}-{key[:32]}.lock", "a")
    except OSError as e:
        logger.warning("cannot lock the cache entry %s/%s: %s", kind, key[:16], e)
        data = compute()
        write_entry(cache_dir, kind, key, suffix, data)
        return data
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        hit = read_entry(cache_dir, kind, key, suffix)
        if hit is not None:
            return hit
        data = compute()
        write_entry(cache_dir, kind, key, suffix, data)
        return data
