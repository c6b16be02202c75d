"""Checkpoints are atomic, pruned by content (this run's only), checked against the manifest, and a
write that fails (a full disk, a read-only directory) is one line and no lost checkpoint. (A real peer
whose disk fills as it trains: tests/test_stop.py.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import tmpfs
from swarmloco.node.checkpoint import (CheckpointError, identify, latest_checkpoint, list_checkpoints,
                                       load_checkpoint, save_checkpoint)

OURS, THEIRS = "ab" * 32, "cd" * 32


def _state(step: int, manifest: str = OURS, numel: int = 3) -> dict:
    return {"outer_step": step, "manifest_hash": manifest, "model": {"w": torch.full((numel,), float(step))},
            "outer_optimizer": {"state": {}, "param_groups": []}}


def _steps(directory, manifest=OURS) -> list[int]:
    return [i.outer_step for i in list_checkpoints(directory, manifest)]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 600 kB file system: room for one small checkpoint, not for a large one."""
    disk = tmpfs(tmp_path / "disk", "600k")
    if disk is None:
        pytest.skip("cannot mount a tmpfs here (needs root); test_a_file_size_limit_is_one_line covers it")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_save_load_and_prune(tmp_path) -> None:
    for step in range(1, 5):
        save_checkpoint(tmp_path, _state(step), keep=2)
    assert _steps(tmp_path) == [3, 4]
    state = latest_checkpoint(tmp_path, OURS)
    assert state["outer_step"] == 4 and torch.equal(state["model"]["w"], torch.full((3,), 4.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_keys_it_does_not_know_are_kept(tmp_path) -> None:
    path = save_checkpoint(tmp_path, {**_state(1), "lineage": {"certificate": [1, 2, 3]}})
    assert load_checkpoint(path, OURS)["lineage"] == {"certificate": [1, 2, 3]}


def test_wrong_manifest_is_refused(tmp_path) -> None:
    path = save_checkpoint(tmp_path, _state(1))
    with pytest.raises(CheckpointError, match="belongs to manifest"):
        load_checkpoint(path, THEIRS)


def test_foreign_and_corrupt_files_are_never_pruned_resumed_or_overwritten(tmp_path) -> None:
    # another run's newer checkpoint under the old naming, a torn file numbered higher than anything,
    # a file squatting on our own next name, and unrelated files
    torch.save({"format": 1, "time": 0.0, **_state(50, THEIRS)}, tmp_path / "outer_00000050.pt")
    (tmp_path / "outer_00000099.pt").write_bytes(b"\x00torn")
    squat = tmp_path / f"outer_00000002-{OURS[:12]}.pt"
    squat.write_bytes(b"not a checkpoint")
    torch.save({"weights": torch.ones(2)}, tmp_path / "model.pt")
    (tmp_path / "notes.txt").write_text("keep me")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    for step in range(1, 6):
        save_checkpoint(tmp_path, _state(step), keep=2)
    assert _steps(tmp_path) == [4, 5]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before  # untouched
    assert latest_checkpoint(tmp_path, OURS)["outer_step"] == 5  # not 99, not the other run's 50
    assert _steps(tmp_path, THEIRS) == [50] and latest_checkpoint(tmp_path, THEIRS)["outer_step"] == 50


def test_a_newer_checkpoint_of_the_run_is_never_deleted(tmp_path) -> None:
    save_checkpoint(tmp_path, _state(10), keep=1)  # a longer run, then a restart without --resume
    for step in range(1, 4):
        written = save_checkpoint(tmp_path, _state(step), keep=1)
        assert identify(written).outer_step == step  # what was just written survives its own pruning
    assert _steps(tmp_path) == [3, 10]


def test_torn_file_is_skipped_for_the_previous_one(tmp_path) -> None:
    save_checkpoint(tmp_path, _state(1))
    (tmp_path / f"outer_00000002-{OURS[:12]}.pt").write_bytes(b"\x00garbage")
    assert latest_checkpoint(tmp_path, OURS)["outer_step"] == 1


def test_unwritable_directory_is_a_clear_error(tmp_path) -> None:
    target = tmp_path / "file-not-dir"
    target.write_text("x")
    with pytest.raises(CheckpointError, match="could not write checkpoint") as e:
        save_checkpoint(target, _state(1))
    assert "\n" not in str(e.value)


def test_a_read_only_file_system_is_one_line(tmp_path) -> None:
    ro = tmpfs(tmp_path / "ro", "100k")
    if ro is None:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with pytest.raises(CheckpointError, match="Read-only file system") as e:
            save_checkpoint(ro, _state(1))
        assert "\n" not in str(e.value)
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(small_disk) -> None:
    save_checkpoint(small_disk, _state(1))
    with pytest.raises(CheckpointError) as e:  # torch.save raises RuntimeError here, not OSError
        save_checkpoint(small_disk, _state(2, numel=400_000))
    message = str(e.value)
    assert "no space left" in message.lower() and "\n" not in message, message
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained tracebacks
    assert sorted(p.name for p in small_disk.iterdir()) == [f"outer_00000001-{OURS[:12]}.pt"]  # no temp left
    assert latest_checkpoint(small_disk, OURS)["outer_step"] == 1


def test_a_file_size_limit_is_one_line_too(tmp_path) -> None:
    """The same failure without root: RLIMIT_FSIZE makes the write fail (EFBIG) part way through."""
    code = textwrap.dedent(f"""
        import resource, signal, torch
        from swarmloco.node.checkpoint import CheckpointError, save_checkpoint, latest_checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        state = lambda step, n: {{"outer_step": step, "manifest_hash": "{OURS}", "model": {{"w": torch.ones(n)}},
                                 "outer_optimizer": {{}}}}
        save_checkpoint({str(tmp_path)!r}, state(1, 10))
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            save_checkpoint({str(tmp_path)!r}, state(2, 400_000))
        except CheckpointError as e:
            print("ERROR", e)
        print("LATEST", latest_checkpoint({str(tmp_path)!r}, "{OURS}")["outer_step"])
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ERROR could not write checkpoint") and lines[1] == "LATEST 1", done.stdout
    assert "Traceback" not in done.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
