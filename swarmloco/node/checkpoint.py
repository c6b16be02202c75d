"""Checkpoints: the agreed global model, the outer optimizer, the outer step and the manifest hash.

Written atomically (temp file in the same directory, fsync, ``os.replace``), so a crash or a full
disk mid-write never leaves a torn checkpoint behind: the previous one stays valid. Format
(``torch.save`` of a dict, loaded with ``weights_only=True``)::

    {"format": 1, "outer_step": int, "manifest_hash": str,
     "model": state_dict (global params), "outer_optimizer": optimizer state_dict,
     "inner_optimizer": AdamW state_dict (optional, this peer's own), "time": float}
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT = 1
_NAME = re.compile(r"^outer_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or is unusable for this run."""


def checkpoint_path(directory: str | Path, outer_step: int) -> Path:
    return Path(directory) / f"outer_{outer_step:08d}.pt"


def save_checkpoint(directory: str | Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write ``state`` (must hold outer_step) and prune to the newest ``keep`` files."""
    directory = Path(directory)
    target = checkpoint_path(directory, int(state["outer_step"]))
    payload = {"format": FORMAT, "time": time.time(), **state}
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
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {target}: {e.strerror or e}") from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    for old in list_checkpoints(directory)[:-keep]:
        try:
            old.unlink()
        except OSError as e:
            logger.warning("could not remove old checkpoint %s: %s", old, e)
    return target


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in a directory, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load_checkpoint(path: str | Path, manifest_hash: str | None = None) -> dict[str, Any]:
    """Load and check a checkpoint; CheckpointError with a one-line reason if it is unusable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file
        raise CheckpointError(f"could not read checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a swarmloco checkpoint (format {FORMAT})")
    for key in ("outer_step", "manifest_hash", "model", "outer_optimizer"):
        if key not in state:
            raise CheckpointError(f"{path} lacks '{key}'")
    if manifest_hash is not None and state["manifest_hash"] != manifest_hash:
        raise CheckpointError(
            f"{path} belongs to manifest {state['manifest_hash'][:12]}, this run is {manifest_hash[:12]}"
        )
    return state


def latest_checkpoint(directory: str | Path, manifest_hash: str | None = None) -> dict[str, Any] | None:
    """The newest usable checkpoint in ``directory`` (skipping unreadable ones), or None."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path, manifest_hash)
        except CheckpointError as e:
            logger.warning("%s", e)
    return None
