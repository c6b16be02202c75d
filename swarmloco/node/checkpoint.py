"""Checkpoints: the agreed global model, the outer optimizer, the outer step and the manifest hash.

Written atomically (temp file in the same directory, fsync, ``os.replace``), so a crash or a full disk
mid-write leaves the previous checkpoint valid. Any failure to write (full disk, read-only or missing
directory, I/O error; ``torch.save`` raises ``RuntimeError`` for some) is one :class:`CheckpointError` with a
one-line reason: the peer logs it and trains on. Format: ``torch.save`` of a dict, loaded with
``weights_only=True``; its keys are in docs/operating.md, "Checkpoints" (``format`` 1, ``outer_step``,
``manifest_hash``, ``model``, ``outer_optimizer``, ...), and keys this module does not know are kept as they are.

**Which files are this run's** is decided by their content, never by their name: a dict of this format whose
``manifest_hash`` is the run's; its ``outer_step`` says how new it is. Anything else in the directory is never
pruned, resumed from or overwritten. Pruning keeps the newest ``keep`` checkpoints of the run up to the one just
written and never deletes a newer one (a restart without ``--resume`` must not erase the longer run's work).
Files are named ``outer_<step>-<manifest hash>.pt`` so two runs sharing a directory do not collide.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT = 1
HASH_CHARS = 12


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or is unusable for this run."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a file on disk is, read from its content."""

    path: Path
    outer_step: int
    manifest_hash: str
    time: float


def checkpoint_path(directory: str | Path, outer_step: int, manifest_hash: str = "") -> Path:
    suffix = f"-{manifest_hash[:HASH_CHARS]}" if manifest_hash else ""
    return Path(directory) / f"outer_{int(outer_step):08d}{suffix}.pt"


_identities: dict[tuple[str, int, int], CheckpointInfo | None] = {}
"""(path, size, mtime) -> what the file is: each file's header is read once while it is unchanged."""


def identify(path: str | Path) -> CheckpointInfo | None:
    """The checkpoint ``path`` holds (format, manifest hash, outer step), or None if it holds none."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _identities:
        return _identities[key]
    info = None
    try:  # mmap: tensors are not read, only the dict's structure
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if (isinstance(state, dict) and state.get("format") == FORMAT and isinstance(state.get("manifest_hash"), str)
                and isinstance(state.get("outer_step"), int) and not isinstance(state.get("outer_step"), bool)):
            info = CheckpointInfo(path, int(state["outer_step"]), state["manifest_hash"],
                                  float(state.get("time") or 0.0))
        del state
    except Exception as e:  # noqa: BLE001 - a torn, foreign or non-torch file: not a checkpoint of ours
        logger.debug("%s is not a checkpoint: %s", path, _one_line(e))
    if len(_identities) > 4096:
        _identities.clear()
    _identities[key] = info
    return info


def list_checkpoints(directory: str | Path, manifest_hash: str | None = None) -> list[CheckpointInfo]:
    """The checkpoints in ``directory`` (of the run ``manifest_hash``, if given), oldest outer step first."""
    directory = Path(directory)
    try:
        candidates = [p for p in directory.iterdir() if p.suffix == ".pt" and not p.name.startswith(".tmp-")
                      and p.is_file()]
    except OSError:
        return []
    found = [info for p in candidates if (info := identify(p)) is not None
             and (manifest_hash is None or info.manifest_hash == manifest_hash)]
    return sorted(found, key=lambda i: (i.outer_step, i.time, i.path.name))


def save_checkpoint(directory: str | Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write ``state`` (must hold outer_step and manifest_hash; other keys are kept as they
    are) and prune this run's older checkpoints to ``keep``. CheckpointError (one line) on any failure."""
    directory = Path(directory)
    manifest_hash = str(state.get("manifest_hash") or "")
    step = int(state["outer_step"])
    payload = {"format": FORMAT, "time": time.time(), **state}
    target = _free_name(directory, step, manifest_hash)
    tmp_name = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
        tmp_name = None
        _fsync_dir(directory)
    except Exception as e:  # noqa: BLE001 - full disk (torch: RuntimeError), read-only, I/O error: one line
        raise CheckpointError(f"could not write checkpoint {target}: {_write_failure(e, directory)}") from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    if manifest_hash:
        prune(directory, manifest_hash, keep, written=target, written_step=step)
    return target


def prune(directory: str | Path, manifest_hash: str, keep: int, written: Path, written_step: int) -> list[Path]:
    """Delete this run's checkpoints older than the newest ``keep`` up to ``written``; returns the deleted."""
    ours = list_checkpoints(directory, manifest_hash)
    up_to = [i for i in ours if i.outer_step <= written_step and i.path != written]
    doomed = up_to[:max(0, len(up_to) - (keep - 1))]  # ``written`` is one of the ``keep``
    deleted = []
    for info in doomed:
        try:
            info.path.unlink()
            deleted.append(info.path)
        except OSError as e:
            logger.warning("could not remove old checkpoint %s: %s", info.path, e.strerror or e)
    return deleted


def load_checkpoint(path: str | Path, manifest_hash: str | None = None) -> dict[str, Any]:
    """Load and check a checkpoint; CheckpointError with a one-line reason if it is unusable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file
        raise CheckpointError(f"could not read checkpoint {path}: {_one_line(e)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a swarmloco checkpoint (format {FORMAT})")
    for key in ("outer_step", "manifest_hash", "model", "outer_optimizer"):
        if key not in state:
            raise CheckpointError(f"{path} lacks '{key}'")
    if manifest_hash is not None and state["manifest_hash"] != manifest_hash:
        raise CheckpointError(
            f"{path} belongs to manifest {str(state['manifest_hash'])[:12]}, this run is {manifest_hash[:12]}"
        )
    return state


def latest_checkpoint(directory: str | Path, manifest_hash: str | None = None) -> dict[str, Any] | None:
    """The newest usable checkpoint of the run in ``directory`` (by content; others skipped), or None."""
    for info in reversed(list_checkpoints(directory, manifest_hash)):
        try:
            return load_checkpoint(info.path, manifest_hash)
        except CheckpointError as e:
            logger.warning("%s", e)
    return None


def _free_name(directory: Path, step: int, manifest_hash: str) -> Path:
    """The target name; if a file of that name holds something else (not this run's checkpoint of this
    step), a numbered variant, so nothing foreign is ever overwritten."""
    target = checkpoint_path(directory, step, manifest_hash)
    n = 1
    while target.exists():
        info = identify(target)
        if info is not None and info.manifest_hash == manifest_hash and info.outer_step == step:
            return target
        n += 1
        target = target.with_name(f"{checkpoint_path(directory, step, manifest_hash).stem}.{n}.pt")
    return target


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_failure(e: BaseException, directory: Path) -> str:
    """Why a write failed, in a few words (torch's own message for a full disk names no cause)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if free is not None and free < (1 << 20):
        return f"no space left on the device ({free // 1000} kB free)"
    return _one_line(e)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    text = text[:200] + "..." if len(text) > 200 else text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


__all__ = ["CheckpointError", "CheckpointInfo", "checkpoint_path", "identify", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "prune", "save_checkpoint"]
