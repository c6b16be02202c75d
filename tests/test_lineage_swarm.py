"""The swarm, not one peer, decides the model: real peer processes on loopback.

A loner far ahead, a healed partition, peers that lie in signed heartbeats, and a peer killed in the
middle of an all-reduce on a loaded machine. Every wait is bounded by rounds or seconds.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from test_faults import FAST, PACED, assert_same_state, rounds_until, start_swarm
from swarmloco.protocol.processes import signal_session
from swarmloco.node.lineage import Chain

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def dropped_work(peer) -> list[str]:
    """Adoptions in which this peer left its lineage (dropping rounds), as opposed to catching up on it."""
    return [e["message"] for e in peer.seen if e.get("kind") == "state_downloaded" and "dropped" in e["message"]]


def steps_are_consecutive(rounds: list[dict]) -> bool:
    ok = [r for r in rounds if r["ok"]]
    return all(b["outer_step"] == a["outer_step"] + 1 for a, b in zip(ok, ok[1:]))


def test_a_loner_far_ahead_adopts_the_swarms_lineage_and_the_swarm_keeps_its_own(spawn, write_config, tmp_path):
    loner_cfg = write_config("loner.toml", swarm={**FAST, "min_peers": 1}, checkpoint={"dir": str(tmp_path / "lc")})
    loner = spawn("loner", loner_cfg, "--inner-steps", "1", "--max-outer-steps", "20", env=PACED)
    assert loner.wait(120) == 0  # 20 solo rounds, each certified by the loner alone

    config = write_config(swarm={**FAST, "min_peers": 3})
    swarm = start_swarm(spawn, config, 3)
    before = [rounds_until(p, lambda r: r["ok"] and r["outer_step"] >= 3 and r["peers"] == 3) for p in swarm]
    swarm_step = max(r["outer_step"] for r in before)
    assert swarm_step < 20  # the swarm is far behind the loner's outer step

    back = spawn("loner2", loner_cfg, "--resume", initial_peers=swarm[0].maddrs(), env=PACED)
    assert "resumed from outer step 20" in back.wait_event("checkpoint")["message"]
    adopted = back.wait_event("state_downloaded")["message"]
    assert "3 contributor(s)" in adopted and "20 round(s) since the fork are dropped" in adopted, adopted
    joined = rounds_until(back, lambda r: r["ok"] and r["peers"] == 4, limit=20)
    mates = [rounds_until(p, lambda r, s=joined["outer_step"]: r["outer_step"] == s, limit=1000) for p in swarm]
    assert_same_state(joined, *mates)
    assert joined["outer_step"] < 20  # the swarm's lineage, not the loner's step
    for p in swarm:  # the three never left their lineage
        assert not dropped_work(p) and steps_are_consecutive(p.rounds), p.rounds


def test_a_partition_heals_to_the_larger_sides_lineage(spawn, write_config):
    config = write_config(swarm={**FAST, "min_peers": 2})
    a = start_swarm(spawn, config, 2)
    b0 = spawn("b0", config, env=PACED)
    b = [b0] + [spawn(f"b{i}", config, initial_peers=b0.maddrs(), env=PACED) for i in (1, 2)]
    for side, n in ((a, 2), (b, 3)):  # each side trains on its own lineage first
        assert_same_state(*(rounds_until(p, lambda r, n=n: r["ok"] and r["peers"] == n) for p in side))

    bridge = spawn("bridge", config, initial_peers=a[0].maddrs() + b0.maddrs(), env=PACED)
    healed = rounds_until(bridge, lambda r: r["ok"] and r["peers"] == 6, limit=60, timeout=180)
    for p in a + b:  # every peer holds the healed state at that step (the smaller side on its way there)
        rounds_until(p, lambda r: (r["outer_step"], r["digest"]) == (healed["outer_step"], healed["digest"]),
                     limit=1000)
    for p in a:  # the smaller side left its lineage for the larger one's, saying what it dropped (under load
        # a peer may also have caught up on its own side's lineage before: that adoption drops nothing)
        drops = dropped_work(p)
        assert any("3 contributor(s)" in m and "since the fork are dropped" in m for m in drops), drops
    for p in b:  # the larger side never left its own (a peer of it may catch up on it)
        assert not dropped_work(p) and steps_are_consecutive(p.rounds), p.rounds


class Claimer:
    def __init__(self, config: Path, mode: str, initial_peers: list[str], log: Path):
        cmd = [sys.executable, str(HERE / "hostile_claimer.py"), str(config), mode]
        for m in initial_peers:
            cmd += ["--initial-peers", m]
        self.log = open(log, "a")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.peer_id = None
        line = self.proc.stdout.readline()  # bounded: the claimer prints it once its DHT node is up (or exits)
        if line.startswith("@@swarmloco "):
            self.peer_id = json.loads(line[len("@@swarmloco "):])["peer_id"]
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def kill(self):
        signal_session(self.proc.pid, signal.SIGKILL)  # (hivemind's helpers lead process groups of their own)
        self.proc.wait(10)
        self.log.close()


@pytest.mark.parametrize("mode", ["huge", "current"])
def test_a_peer_claiming_a_lineage_it_cannot_prove_is_excluded_and_the_swarm_keeps_its_pace(
        spawn, write_config, tmp_path, mode):
    config = write_config(swarm={**FAST, "min_peers": 3})
    honest = start_swarm(spawn, config, 3)
    paced = [[rounds_until(p, lambda r: r["ok"] and r["peers"] == 3) for p in honest] for _ in range(2)]
    normal = statistics.median(r["round_time"] for rs in paced for r in rs)

    mark = [len(p.rounds) for p in honest]  # from here on: while the claim is checked, and after
    claimer = Claimer(config, mode, honest[0].maddrs(), tmp_path / "claimer.log")
    try:
        assert claimer.peer_id, (tmp_path / "claimer.log").read_text()[-3000:]
        for p in honest:
            excluded = p.wait_event("peer_excluded", timeout=60)["message"]
            assert claimer.peer_id[-8:] in excluded and "failed the check" in excluded, excluded
        target = max(p.rounds[-1]["outer_step"] for p in honest) + 4
        # (a peer read less far while the others' exclusions were awaited: its queued rounds come first)
        at_target = [rounds_until(p, lambda r: r["ok"] and r["outer_step"] == target,
                                  limit=target - p.rounds[-1]["outer_step"] + 8) for p in honest]
    finally:
        claimer.kill()
    assert_same_state(*at_target)
    for p, start in zip(honest, mark):  # they kept their pace and their lineage all along
        recent = p.rounds[start:]
        commits = [r for r in recent if r["ok"] and not r["adopted"]]
        assert all(r["peers"] == 3 for r in commits) and len(commits) >= len(recent) - 1, recent
        # (a round matchmaking split under load is re-run: its time is not the claimer's)
        paced = [r["round_time"] for r in recent if r["attempts"] <= 1]
        assert len(paced) >= len(recent) - 1 and max(paced) < 2 * normal + 2, (normal, recent)
        assert not dropped_work(p) and steps_are_consecutive(p.rounds)


def test_a_peer_killed_mid_allreduce_on_a_loaded_machine_costs_survivors_one_round_and_no_solo_commit(
        spawn, write_config, tmp_path, cpu_hog):
    configs = [write_config(f"p{i}.toml", swarm={**FAST, "min_peers": 4}, checkpoint={"dir": str(tmp_path / f"c{i}")})
               for i in range(4)]
    first = spawn("p0", configs[0], env=PACED)
    peers = [first] + [spawn(f"p{i}", configs[i], initial_peers=first.maddrs(),
                             env={"SWARMLOCO_FAULT": "hang_allreduce:3"} if i == 3 else PACED) for i in (1, 2, 3)]
    survivors, victim = peers[:3], peers[3]
    normal_rounds = [[p.next_round() for p in peers] for _ in range(2)]
    normal = statistics.median(r["round_time"] for rs in normal_rounds for r in rs if r["peers"] == 4)

    hang = victim.wait_event("fault")  # the victim is a reducer in the middle of its third all-reduce
    step = victim.rounds[-1]["outer_step"]  # ... the one for this outer step
    victim.signal_session(signal.SIGKILL)
    # the harness's reaction between the victim's hang and its kill (seconds on a loaded machine) is no part
    # of the fault's cost: a real crash has no such pause, it is the moment the peer dies
    reaction = max(0.0, time.time() - hang["time"])
    # (a survivor may also adopt that step: matchmaking under load can leave one live member out)
    hit = [rounds_until(p, lambda r: r["outer_step"] == step + 1) for p in survivors]
    brief = [{k: r.get(k) for k in ("outer_step", "peers", "attempts", "adopted", "round_time", "compute_s", "barrier_s",
                                    "matchmaking_s", "allreduce_s", "retried", "error")} for r in hit]
    assert_same_state(*hit)
    # the three re-ran it together (or, when a failed round moved the victim's hang a round later, the four
    # committed it before the kill)
    assert all(r["peers"] >= 3 for r in hit if not r["adopted"]), brief
    stall = max(r["round_time"] for r in hit) - normal - reaction
    assert stall <= normal + 2.0, f"normal {normal:.2f}s, reaction {reaction:.2f}s: {brief}"  # (a str: shown whole)
    after = [p.next_round() for p in survivors]
    assert_same_state(*after)
    for p in survivors:  # no survivor ever committed a round alone
        assert all(r["peers"] >= 3 for r in p.rounds if r["ok"] and not r["adopted"]), p.rounds

    for p in survivors:
        p.signal(signal.SIGTERM)
        assert p.wait(60) == 0
    saved = torch.load(sorted((tmp_path / "c0").glob("*.pt"))[-1], weights_only=True)
    chain = Chain.from_state(saved["manifest_hash"], saved["lineage"])  # verifies every certificate
    assert chain.tip_step == saved["outer_step"] and chain.root_step == 0
    # co-signed: members add each other's signatures from heartbeats (a member whose round failed while the
    # others committed it never signs; the last rounds' signatures may still have been on their way)
    assert all(len(c.signers()) >= 2 for c in chain.certs[:-2]), \
        [(c.step, len(c.signers()), len(c.header.members)) for c in chain.certs]
