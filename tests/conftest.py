from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peers import PeerProcess
from swarmloco.config import RunConfig, config_from_dict, dump_toml

# small enough that a round of 3 peers takes a few seconds on 2 CPU cores
TINY = {
    "run_id": "test",
    "model": {"n_layer": 1, "n_embd": 64, "n_head": 2, "block_size": 32},
    "data": {"max_bytes": 2_000_000, "batch_size": 8, "eval_batches": 4, "num_shards": 8},
    "inner": {"steps": 8, "warmup_steps": 4, "lr": 3e-3},
    "swarm": {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "matchmaking_time": 2.0, "request_timeout": 1.0,
              "ready_timeout": 30.0, "allreduce_timeout": 30.0, "next_chunk_timeout": 5.0,
              "heartbeat_period": 1.0, "heartbeat_ttl": 6.0},
}


def tiny_config(**sections) -> RunConfig:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return config_from_dict(data)


@pytest.fixture
def write_config(tmp_path: Path):
    def write(name: str = "run.toml", **sections) -> Path:
        path = tmp_path / name
        path.write_text(dump_toml(tiny_config(**sections)))
        return path

    return write


@pytest.fixture
def spawn(tmp_path: Path):
    """Start peer processes; every one of them (and its process group) is killed at teardown."""
    started: list[PeerProcess] = []

    def start(name: str, config: Path | None, *args: str, initial_peers: list[str] = (),
              env: dict[str, str] | None = None, command: str = "run", verbose: bool = True) -> PeerProcess:
        peer = PeerProcess(name, config, tmp_path, *args, initial_peers=initial_peers, env=env, command=command,
                           verbose=verbose)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.kill()


def tmpfs(path: Path, size: str) -> Path | None:
    """Mount a tmpfs of ``size`` at ``path`` (a disk that fills; root only); None where that is impossible.
    The caller unmounts it (``umount -l``)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return None
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return path if done.returncode == 0 else None


@pytest.fixture
def cpu_hog():
    """Two busy processes: the machine's two cores are loaded while the test runs."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for h in hogs:
        h.kill()
        h.wait(10)
