"""The group of a round is formed from the barrier's members: they follow the smallest peer id at once.
A leader that dies right when its mates ask it costs them one bounded attempt, never a hang."""

from __future__ import annotations

import signal

import pytest

from swarmloco.protocol.identity import Identity
from test_faults import FAST, assert_same_state, rounds_until

pytestmark = pytest.mark.slow


def test_a_dead_expected_leader_costs_its_mates_a_bounded_rerun(spawn, write_config, tmp_path) -> None:
    keys = []
    for i in range(3):
        identity = Identity.generate()
        path = tmp_path / f"key{i}"
        identity.write_libp2p_key(path)
        keys.append((identity.libp2p_peer_id(), path))
    keys.sort()  # the first one is every barrier's expected leader: it hangs after its second barrier
    config = write_config(swarm={**FAST, "min_peers": 3})
    leader = spawn("leader", config, "--identity", str(keys[0][1]), env={"SWARMLOCO_FAULT": "hang_at_barrier:2"})
    others = [spawn(f"p{i}", config, "--identity", str(keys[i][1]), initial_peers=leader.maddrs())
              for i in (1, 2)]
    first = [p.next_round() for p in (leader, *others)]
    assert_same_state(*first)
    assert all(r["peers"] == 3 for r in first if not r["adopted"]), first
    leader.wait_event("fault")  # its mates have it as their ready leader now
    step = first[0]["outer_step"]
    leader.signal_session(signal.SIGKILL)

    survived = [rounds_until(p, lambda r: r["outer_step"] >= step + 1) for p in others]
    top = max(r["outer_step"] for r in survived)
    level = [r if r["outer_step"] == top else rounds_until(p, lambda r: r["outer_step"] == top, limit=20)
             for p, r in zip(others, survived)]
    assert_same_state(*level)
    assert all(r["round_time"] < 30 for r in survived), survived  # bounded: no 11 s dials, no matchmaking hang
    after = [rounds_until(p, lambda r, s=top + 1: r["outer_step"] == s) for p in others]
    assert_same_state(*after)
    assert all(r["peers"] == 2 for r in after)
