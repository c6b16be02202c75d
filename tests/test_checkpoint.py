"""Checkpoints are atomic, pruned, and checked against the manifest."""

import os

import pytest
import torch

from swarmloco.node.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                                       save_checkpoint)


def _state(step: int) -> dict:
    return {"outer_step": step, "manifest_hash": "ab" * 32, "model": {"w": torch.full((3,), float(step))},
            "outer_optimizer": {"state": {}, "param_groups": []}}


def test_save_load_and_prune(tmp_path) -> None:
    for step in range(1, 5):
        save_checkpoint(tmp_path, _state(step), keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["outer_00000003.pt", "outer_00000004.pt"]
    state = latest_checkpoint(tmp_path, "ab" * 32)
    assert state["outer_step"] == 4 and torch.equal(state["model"]["w"], torch.full((3,), 4.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_wrong_manifest_is_refused(tmp_path) -> None:
    path = save_checkpoint(tmp_path, _state(1))
    with pytest.raises(CheckpointError, match="belongs to manifest"):
        load_checkpoint(path, "cd" * 32)


def test_torn_file_is_skipped_for_the_previous_one(tmp_path) -> None:
    save_checkpoint(tmp_path, _state(1))
    (tmp_path / "outer_00000002.pt").write_bytes(b"\x00garbage")
    assert latest_checkpoint(tmp_path, "ab" * 32)["outer_step"] == 1


def test_unwritable_directory_is_a_clear_error(tmp_path) -> None:
    target = tmp_path / "ro"
    target.mkdir()
    os.chmod(target, 0o500)
    try:
        if os.access(target, os.W_OK):  # running as root: simulate a full disk instead
            target = tmp_path / "file-not-dir"
            target.write_text("x")
        with pytest.raises(CheckpointError, match="could not write checkpoint"):
            save_checkpoint(target, _state(1))
    finally:
        os.chmod(tmp_path / "ro", 0o700)
