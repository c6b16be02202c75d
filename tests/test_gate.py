"""Access control at matchmaking and state download, with real hivemind transports on loopback."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from swarmloco.compression import get_codec
from swarmloco.config import CodecConfig, SwarmConfig
from swarmloco.protocol.identity import Identity


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """Peers A and B (which admit each other only) and C, each with an Ed25519 identity."""
    from swarmloco.protocol.transport import SwarmTransport

    tmp = tmp_path_factory.mktemp("keys")
    cfg = SwarmConfig(host_maddrs=("/ip4/127.0.0.1/tcp/0",), next_chunk_timeout=3.0, allreduce_timeout=10.0,
                      request_timeout=1.0, matchmaking_time=2.0)
    codec, templates = get_codec(CodecConfig()), [torch.zeros(64), torch.zeros(8, 8)]
    ids, transports = [Identity.generate() for _ in range(3)], []
    for i, identity in enumerate(ids):
        identity.write_libp2p_key(tmp / f"{i}.key")
        peers = tuple(transports[0].visible_maddrs()) if transports else ()
        transports.append(SwarmTransport(dataclasses.replace(cfg, initial_peers=peers), prefix="g", codec=codec,
                                         templates=templates, identity_path=str(tmp / f"{i}.key")))
    assert [t.peer_id for t in transports] == [i.libp2p_peer_id() for i in ids]
    yield ids, transports
    for t in transports:
        t.shutdown()


def run_round(transports, expected: int = 3):
    handles, outputs = [], []
    scheduled = time.time() + 2.0
    for i, t in enumerate(transports):
        tensors = [torch.full((64,), float(i)), torch.full((8, 8), float(i))]
        out = [torch.zeros_like(x) for x in tensors]
        outputs.append(out)
        handles.append(t.start_round(tensors, out, weight=1.0, gather={"i": i}, scheduled_time=scheduled,
                                     timeout=6.0, expected_group_size=expected))
    return [h.result() for h in handles], outputs


@pytest.mark.slow
@pytest.mark.parametrize("how", ["private run, no token", "excluded"])
def test_a_refused_peer_never_gets_into_the_group(trio, how) -> None:
    ids, (a, b, c) = trio
    if how == "excluded":
        for t in (a, b):
            t.set_gate(False, frozenset(), frozenset({c.peer_id}))
    else:
        members = frozenset({ids[0].public_bytes, ids[1].public_bytes})
        for t in (a, b):
            t.set_gate(True, members, frozenset())
    c.set_gate(False, frozenset(), frozenset())  # C itself would take anyone
    try:
        for _ in range(3):  # matchmaking is random: C gets several chances to slip in
            (ra, rb, rc), outputs = run_round([a, b, c])
            assert ra.ok and rb.ok, (ra.error, rb.error)
            assert set(ra.gathered) == set(rb.gathered) == {a.peer_id, b.peer_id}
            assert torch.equal(outputs[0][0], torch.full((64,), 0.5))  # C's values never counted
            assert not (rc.ok and rc.group_size > 1 and a.peer_id in rc.gathered)
    finally:
        for t in (a, b, c):
            t.set_gate(False, frozenset(), frozenset())


@pytest.mark.slow
def test_a_private_run_serves_its_state_to_token_holders_only(trio) -> None:
    ids, (a, b, c) = trio
    a.set_state_provider(lambda: ({"step": 3}, [torch.ones(5)]))
    a.set_gate(True, frozenset({ids[0].public_bytes, ids[1].public_bytes}), frozenset())
    try:
        got, _ = b.download_state([a.peer_id], timeout=5, max_bytes=1 << 20, parallel=1)
        assert got is not None and got.metadata == {"step": 3}
        refused, errors = c.download_state([a.peer_id], timeout=5, max_bytes=1 << 20, parallel=1)
        assert refused is None and errors
        sharded, _ = c.download_state([a.peer_id, b.peer_id], timeout=5, max_bytes=1 << 20, parallel=2)
        assert sharded is None or a.peer_id not in sharded.sources
    finally:
        a.set_gate(False, frozenset(), frozenset())


def test_a_join_that_got_no_answer_in_time_is_remembered_until_a_join_succeeds(monkeypatch) -> None:
    """The peer a leader may have counted in without telling it (see SwarmAverager.rpc_aggregate_part)."""
    import asyncio

    from hivemind.averaging.matchmaking import Matchmaking

    from swarmloco.protocol.gate import Gate, GatedMatchmaking

    answers = []  # (seconds before the leader answers, the group it answers with)

    async def leader_answers(self, leader):
        delay, group = answers.pop(0)
        await asyncio.sleep(delay)
        return group

    monkeypatch.setattr(Matchmaking, "_request_join_group", leader_answers)
    mm = object.__new__(GatedMatchmaking)
    mm.gate, mm.request_timeout, mm.join_timed_out = Gate(), 0.05, False

    async def join(delay, group):
        answers.append((delay, group))
        return await mm._request_join_group("leader")

    assert asyncio.run(join(0.0, None)) is None and not mm.join_timed_out  # a quick refusal: not counted in
    asyncio.run(join(0.1, None))
    assert mm.join_timed_out  # no answer in time: the leader may run a group with this peer in it
    asyncio.run(join(0.0, None))
    assert mm.join_timed_out  # a quick refusal of another leader changes nothing
    assert asyncio.run(join(0.0, "group")) == "group" and not mm.join_timed_out
