"""The monitor's swarm view against a live 2-peer swarm on loopback; identities survive restarts."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest

from swarmloco.config import SwarmConfig
from swarmloco.protocol.progress import SwarmWatcher
from swarmloco.protocol.transport import DhtClient
from swarmloco.tui import MonitorApp

pytestmark = pytest.mark.slow


def test_monitor_lists_the_peers_of_a_live_swarm(spawn, write_config) -> None:
    config = write_config()
    a = spawn("a", config, "--shard", "0", "--max-outer-steps", "1000")
    maddrs = a.maddrs()
    b = spawn("b", config, "--shard", "1", "--max-outer-steps", "1000", initial_peers=maddrs[:1])
    b.maddrs()
    client = DhtClient(SwarmConfig(initial_peers=tuple(maddrs[:1]), host_maddrs=("/ip4/127.0.0.1/tcp/0",),
                                   client_mode=True))
    try:
        watcher = SwarmWatcher(client, "test", ttl=6.0)
        deadline, peers = time.monotonic() + 60, []
        while time.monotonic() < deadline and len(peers) < 2:
            peers = watcher.fetch()
            time.sleep(0.2)
        assert {p["peer_id"] for p in peers} == {a.maddrs()[0].rsplit("/", 1)[-1], b.maddrs()[0].rsplit("/", 1)[-1]}

        async def run() -> int:
            app = MonitorApp(None, watcher, initial_view="swarm")
            async with app.run_test(size=(100, 30)) as pilot:
                for _ in range(50):
                    await pilot.pause(0.2)
                    table = app.query_one("DataTable")
                    if table.row_count >= 2:
                        return table.row_count
            return 0

        assert asyncio.run(run()) == 2
    finally:
        client.shutdown()
    for p in (a, b):
        p.signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0


def test_identity_keeps_the_peer_id_across_restarts(spawn, write_config, tmp_path) -> None:
    key = tmp_path / "id.key"
    out = subprocess.run([sys.executable, "-m", "swarmloco", "keygen", str(key)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    peer_id = out.stdout.split()[2]
    config = write_config()
    for attempt in range(2):
        peer = spawn(f"p{attempt}", config, "--identity", str(key), "--max-outer-steps", "1")
        assert peer.maddrs()[0].endswith(f"/p2p/{peer_id}")
        assert peer.wait(timeout=60) == 0
