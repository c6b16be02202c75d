"""Rounds overlapped with the next inner steps and streaming fragments, in real peer processes on loopback:
replicas stay bit-identical, a peer killed mid-round costs the others no hang and no divergence, a late
joiner gets a whole state."""

from __future__ import annotations

import math
import signal

import pytest

from test_swarm import _start_swarm

pytestmark = pytest.mark.slow


def _rounds_up_to(peer, step: int, timeout: float = 120) -> dict[int, dict]:
    """This peer's round records by outer step, until it reported ``step``."""
    out = {}
    while step not in out:
        r = peer.next_round(timeout=timeout)
        out[r["outer_step"]] = r
    return out


@pytest.mark.parametrize("outer", [
    {"overlap": "delayed"},
    {"overlap": "eager", "overlap_steps": 3},
    {"overlap": "delayed", "fragments": 2, "overlap_steps": 2, "overlap_alpha": 0.5},
    {"overlap": "eager", "fragments": 4, "overlap_steps": 8},  # tau = H: up to 4 rounds in flight
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_overlapped_rounds_keep_three_peers_bit_identical(spawn, write_config, outer) -> None:
    config = write_config(outer=outer)
    last = 6  # (with fragments the held-out loss is evaluated every `fragments` rounds: the last one is checked)
    peers = _start_swarm(spawn, config, 3, "--max-outer-steps", str(last + 1))
    seen = [_rounds_up_to(p, last) for p in peers]
    together = 0
    for step in range(1, last + 1):
        got = [s.get(step) for s in seen]
        assert all(r is not None for r in got), f"outer step {step} missing on a peer: {[sorted(s) for s in seen]}"
        assert len({r["digest"] for r in got}) == 1, f"global params diverged after outer step {step}"
        assert all(r["overlapped"] for r in got if not r["adopted"])
        together += all(r["ok"] and r["peers"] == 3 and not r["adopted"] for r in got)
    assert together >= last - 2, "the three peers should average together in (nearly) every round"
    final = next(seen[0][s] for s in range(last, 0, -1) if math.isfinite(seen[0][s]["eval_loss"]))
    assert math.isfinite(final["eval_loss"]) and final["eval_loss"] < final["initial_eval_loss"]
    blocked = [r["blocked_s"] for s in seen for r in s.values() if r["ok"] and not r["adopted"]]
    compute = [r["compute_s"] for s in seen for r in s.values() if r["ok"] and not r["adopted"]]
    assert all(b >= 0 for b in blocked) and all(c > 0 for c in compute)
    for p in peers:
        assert p.wait(timeout=90) == 0, p.log_text()


def test_sigkill_during_a_background_round_costs_the_survivors_no_hang_and_no_divergence(spawn, write_config) -> None:
    from test_faults import FAST, assert_same_state, rounds_until, start_swarm

    config = write_config(swarm={**FAST, "min_peers": 3}, outer={"overlap": "delayed"})
    # p2's second all-reduce: it takes the others' parts and hangs there; its training goes on until the
    # round is due to land; we kill its whole machine while the others' rounds run behind their training
    p0, p1, victim = start_swarm(spawn, config, 3, env_for={2: {"SWARMLOCO_FAULT": "hang_allreduce:2"}})
    first = [p.next_round() for p in (p0, p1, victim)]
    assert_same_state(*first)
    victim.wait_event("fault")
    step = first[0]["outer_step"]  # its second round is the one of this outer step
    victim.signal_session(signal.SIGKILL)

    survived = [rounds_until(p, lambda r: r["outer_step"] >= step + 1) for p in (p0, p1)]
    top = max(r["outer_step"] for r in survived)
    level = [r if r["outer_step"] == top else rounds_until(p, lambda r: r["outer_step"] == top, limit=20)
             for p, r in zip((p0, p1), survived)]
    assert_same_state(*level)  # re-run without p2 (or dropped, then caught up): the same bits on both
    for p in (p0, p1):  # no survivor committed a round alone while the other lived
        assert all(r["peers"] == 2 for r in p.rounds if r["ok"] and not r["adopted"] and r["outer_step"] > step), \
            p.rounds
    after = [rounds_until(p, lambda r, s=top + 1: r["outer_step"] == s) for p in (p0, p1)]
    assert_same_state(*after)  # and the rounds after it go on, overlapped, without waiting for the dead peer
    assert all(r["overlapped"] and r["peers"] == 2 for r in after)
    assert after[0]["round_time"] < 3 * first[0]["round_time"] + 5, after


def test_a_peer_killed_while_several_streaming_rounds_are_in_flight_costs_the_survivors_no_hang_and_no_divergence(
        spawn, write_config) -> None:
    from test_faults import FAST, rounds_until, start_swarm

    # fragments = 2 and tau = H: a round lands a whole H after it started, so two are in flight at a time and their
    # exchanges queue behind each other. p2 hangs as a reducer in its third all-reduce and we kill its whole
    # machine there; with no re-run inside the round (round_retries = 0) that round fails on the survivors, the
    # round queued behind it is not run, and the failed step is run again, with its fragment
    config = write_config(swarm={**FAST, "min_peers": 3, "round_retries": 0},
                          outer={"overlap": "delayed", "fragments": 2, "overlap_steps": 8})
    p0, p1, victim = start_swarm(spawn, config, 3, env_for={2: {"SWARMLOCO_FAULT": "hang_allreduce:3"}})
    victim.wait_event("fault")
    victim.signal_session(signal.SIGKILL)
    goal = max([r["outer_step"] for p in (p0, p1) for r in p.rounds] + [0]) + 6
    seen = []
    for p in (p0, p1):  # bounded: every read waits at most 120 s, and at most 60 reads
        rounds_until(p, lambda r: r["ok"] and r["outer_step"] >= goal, limit=60)
        committed = [r["outer_step"] for r in p.rounds if r["ok"] and not r["adopted"]]
        assert committed == list(range(committed[0], committed[-1] + 1)), p.rounds  # each step once, in order
        failed = next((i for i, r in enumerate(p.rounds) if not r["ok"] and not r["error"].startswith("not run")), None)
        assert failed is not None, f"{p.name}: no round failed at the kill: {p.rounds}"
        after = [r for r in p.rounds[failed + 1:] if r["ok"] and not r["adopted"]]
        # after the failed round: on together, never alone while the other lived, never with p2
        assert after and all(r["peers"] == 2 for r in after), p.rounds
        seen.append({r["outer_step"]: r for r in p.rounds if r["ok"] and not r["adopted"]})
    common = sorted(set(seen[0]) & set(seen[1]))
    assert len(common) >= 6, f"the survivors committed too few rounds together: {common}"
    for step in common:
        assert seen[0][step]["digest"] == seen[1][step]["digest"], f"the survivors diverged at outer step {step}"


def test_a_late_joiner_while_rounds_run_behind_training_gets_a_whole_state(spawn, write_config) -> None:
    from test_faults import FAST, PACED, assert_same_state, rounds_until

    # tau = the whole phase: a round is in flight at nearly every moment, so the download happens during one
    config = write_config(swarm=FAST, outer={"overlap": "eager", "fragments": 2})
    p0 = spawn("p0", config, "--shard", "0", "--min-peers", "2", env=PACED)
    p1 = spawn("p1", config, "--shard", "1", "--min-peers", "2", initial_peers=p0.maddrs(), env=PACED)
    assert_same_state(p0.next_round(), p1.next_round())
    joiner = spawn("p2", config, "--shard", "2", initial_peers=p0.maddrs(), env=PACED)
    downloaded = joiner.wait_event("state_downloaded")
    assert "adopted outer step" in downloaded["message"]
    # every state it adopts is the swarm's whole state at that step, and a round it runs with the swarm leaves it
    # in step with them. (With sub-second rounds always in flight, when it gets in is timing: the swarm launches
    # the next round the moment it lands one, so on a loaded machine a joiner may adopt many times first)
    together, adopted = None, []
    for _ in range(30):
        r = joiner.next_round()
        if r["ok"] and not r["adopted"] and r["peers"] == 3:
            together = r
            break
        if r["adopted"] and len(adopted) < 3:
            adopted.append(r)
    for r in adopted + [together] * (together is not None):
        mates = [rounds_until(p, lambda m, s=r["outer_step"]: m["outer_step"] >= s, limit=1000) for p in (p0, p1)]
        at_step = [m for m in mates if m["outer_step"] == r["outer_step"]]  # (a mate may have adopted past it)
        assert at_step, (r["outer_step"], [m["outer_step"] for m in mates])
        assert_same_state(r, *at_step)
    assert together is not None or len(adopted) == 3


def test_a_checkpoint_holds_whole_rounds_only_and_resumes(spawn, write_config, tmp_path) -> None:
    """A peer stopped while a round runs behind its training lands that round first; every checkpoint it
    wrote is the state after a certified round (its digest is that round's), never a half-applied one."""
    from swarmloco.config import load_config
    from swarmloco.node.checkpoint import list_checkpoints, load_checkpoint
    from swarmloco.app.peer import build_model
    from swarmloco.node.state_sync import params_digest
    from test_faults import PACED

    config = write_config(outer={"overlap": "eager", "fragments": 2, "overlap_steps": 2})
    ckpt = tmp_path / "ckpt"
    peer = spawn("p0", config, "--checkpoint-dir", str(ckpt), env=PACED)
    for _ in range(3):
        peer.next_round()
    peer.signal(signal.SIGTERM)  # (a round of the next phase is in flight nearly all the time)
    assert peer.wait(timeout=60) == 0, peer.log_text()
    while True:  # the round landed on the way out is reported too
        try:
            peer.next_round(timeout=5)
        except (RuntimeError, TimeoutError):
            break
    digests = {r["outer_step"]: r["digest"] for r in peer.rounds}
    infos = list_checkpoints(ckpt)
    assert infos
    names = [name for name, _ in build_model(load_config(config)).named_parameters()]
    for info in infos:
        state = load_checkpoint(info.path)
        got = params_digest(state["model"][name].float() for name in names)
        assert digests.get(state["outer_step"]) == got, f"checkpoint at {state['outer_step']} is no whole round"
    again = spawn("p0b", config, "--checkpoint-dir", str(ckpt), "--resume", "--max-outer-steps", "1", env=PACED)
    assert again.wait(timeout=90) == 0, again.log_text()
    assert again.next_round(timeout=5)["outer_step"] == max(i.outer_step for i in infos) + 1
