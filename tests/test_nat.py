"""Peers behind NAT: a client-mode peer (outgoing connections only) still contributes to every round."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_a_client_mode_peer_averages_with_the_swarm(spawn, write_config) -> None:
    config = write_config(swarm={"min_peers": 3})
    a = spawn("a", config, "--max-outer-steps", "3")
    first = a.maddrs()
    b = spawn("b", config, "--max-outer-steps", "3", initial_peers=first)
    natted = spawn("natted", config, "--max-outer-steps", "3", "--client-mode", initial_peers=first)
    together = 0
    for _ in range(3):
        ra, rb, rn = a.next_round(), b.next_round(), natted.next_round()
        assert ra["ok"] and rn["ok"], (ra, rn)
        if ra["outer_step"] == rb["outer_step"] == rn["outer_step"] and not rn["adopted"]:
            assert ra["digest"] == rb["digest"] == rn["digest"]
            together += ra["peers"] == 3 and rn["peers"] == 3 and rn["bytes_sent"] > 0
    assert together >= 2  # it sent its pseudo-gradient and got the average back, behind its "NAT"
    assert natted.wait(60) == 0
