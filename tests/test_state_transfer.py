"""State download from several peers at once: the shard rule, and real transports on loopback."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from swarmloco.compression import get_codec
from swarmloco.config import CodecConfig, SwarmConfig
from swarmloco.protocol.state_transfer import shard_of


def test_shards_are_contiguous_cover_everything_and_balance_bytes() -> None:
    sizes = [100, 5, 300, 300, 40, 40, 215, 1000, 1, 1]
    for k in range(1, 8):
        owners = shard_of(sizes, k)
        assert owners == sorted(owners) and all(0 <= o < k for o in owners)
    owners = shard_of([10] * 12, 4)
    assert [owners.count(s) for s in range(4)] == [3, 3, 3, 3]
    assert shard_of([], 3) == []


@pytest.fixture(scope="module")
def swarm():
    """Three peers serving the same state and one downloading it (four hivemind transports)."""
    from swarmloco.protocol.transport import SwarmTransport

    state = [torch.randn(3000) for _ in range(5)] + [torch.randn(7, 9)]
    cfg = SwarmConfig(host_maddrs=("/ip4/127.0.0.1/tcp/0",), next_chunk_timeout=5.0, allreduce_timeout=10.0)
    codec, templates = get_codec(CodecConfig()), [torch.zeros(10)]
    first = SwarmTransport(cfg, prefix="t", templates=templates, codec=codec)
    joined = dataclasses.replace(cfg, initial_peers=tuple(first.visible_maddrs()))
    sources = [first] + [SwarmTransport(joined, prefix="t", templates=templates, codec=codec) for _ in range(2)]
    for s in sources:
        s.set_state_provider(lambda: ({"step": 7}, [t.clone() for t in state]))
    joiner = SwarmTransport(joined, prefix="t", templates=templates, codec=codec)
    yield state, sources, joiner
    for t in [joiner, *sources]:
        t.shutdown()


def test_a_state_is_downloaded_in_shards_from_several_peers(swarm) -> None:
    state, sources, joiner = swarm
    got, errors = joiner.download_state([s.peer_id for s in sources], timeout=10, max_bytes=1 << 24, parallel=3)
    assert got is not None and not errors, errors
    assert set(got.sources) == {s.peer_id for s in sources} and got.metadata == {"step": 7}
    assert all(torch.equal(a, b) for a, b in zip(got.tensors, state)) and len(got.tensors) == len(state)


def test_sources_holding_different_states_fall_back_to_one_whole_download(swarm) -> None:
    state, sources, joiner = swarm
    sources[1].set_state_provider(lambda: ({"step": 8}, [t.clone() for t in state]))
    try:
        got, errors = joiner.download_state([s.peer_id for s in sources], timeout=10, max_bytes=1 << 24, parallel=3)
    finally:
        sources[1].set_state_provider(lambda: ({"step": 7}, [t.clone() for t in state]))
    assert any("different states" in e for e in errors), errors
    assert got is not None and got.sources == (sources[0].peer_id,) and got.metadata == {"step": 7}


def test_a_state_larger_than_the_budget_is_refused(swarm) -> None:
    _, sources, joiner = swarm
    got, errors = joiner.download_state([s.peer_id for s in sources], timeout=10, max_bytes=10_000, parallel=3)
    assert got is None and errors and all("more" in e or "bytes" in e for e in errors), errors


def test_a_lineage_proof_is_served_from_the_newest_shared_point(swarm) -> None:
    from test_lineage import GENESIS_DIGEST, KEYS, genesis, grow

    _, sources, joiner = swarm
    chain = grow(genesis(), 40, KEYS[:2], "served")
    sources[0].set_lineage(0, GENESIS_DIGEST, 0, [(c.digest, c.encode()) for c in chain.certs[:30]])
    sources[0].set_lineage(0, GENESIS_DIGEST, 30, [(c.digest, c.encode()) for c in chain.certs[30:]])  # a delta
    mine = type(chain)(chain.manifest, 0, GENESIS_DIGEST, chain.certs[:25])  # a peer 15 rounds behind
    proof, error = joiner.fetch_lineage(sources[0].peer_id, mine.locator(), timeout=5, max_bytes=1 << 20)
    assert error is None and proof["from"] == [25, chain.certs[24].digest]
    assert proof["certs"] == [c.encode() for c in chain.certs[25:]] and proof["tip"] == [40, chain.tip_digest]

    proof, error = joiner.fetch_lineage(sources[0].peer_id, mine.locator(), timeout=5, max_bytes=1000)
    assert proof is None and "larger than" in error  # bounded: a hostile server cannot flood us
    proof, error = joiner.fetch_lineage(sources[1].peer_id, mine.locator(), timeout=5, max_bytes=1 << 20)
    assert proof is None and "served no proof" in error  # a peer with no lineage yet


class Recording:
    """A pipe end that records the pickled size of every message sent through it."""

    def __init__(self, pipe):
        self.pipe, self.sizes = pipe, []

    def send(self, obj) -> None:
        from multiprocessing.reduction import ForkingPickler

        self.sizes.append(len(ForkingPickler.dumps(obj)))
        self.pipe.send(obj)


def test_a_long_lineage_pushed_at_once_reaches_the_averager_whole_and_leaves_it_working(swarm) -> None:
    # (a resumed or adopted chain is pushed whole: hundreds of kB, more than the pipe to hivemind's averager
    # process holds; that process reads the pipe non-blocking, so one big message was read torn and killed it)
    from test_lineage import GENESIS_DIGEST, KEYS, genesis, grow

    _, sources, joiner = swarm
    chain = grow(genesis(), 300, KEYS, "long")
    entries = [(c.digest, c.encode()) for c in chain.certs]
    assert sum(len(d) + len(c) for d, c in entries) > 256 * 1024
    averager = sources[2].averager
    pipe = averager._outer_pipe
    averager._outer_pipe = recording = Recording(pipe)
    try:
        sources[2].set_lineage(0, GENESIS_DIGEST, 0, entries)
    finally:
        averager._outer_pipe = pipe
    sizes = recording.sizes
    assert len(sizes) > 1 and max(sizes) <= 16384, sizes  # (multiprocessing writes larger ones in two parts)
    mine = type(chain)(chain.manifest, 0, GENESIS_DIGEST, [])
    proof, error = joiner.fetch_lineage(sources[2].peer_id, mine.locator(), timeout=10, max_bytes=1 << 22)
    assert error is None and proof["certs"] == [c.encode() for c in chain.certs] and proof["tip"][0] == 300
    more = grow(chain, 1, KEYS, "one more")
    sources[2].set_lineage(0, GENESIS_DIGEST, 300, [(more.certs[-1].digest, more.certs[-1].encode())])
    proof, error = joiner.fetch_lineage(sources[2].peer_id, mine.locator(), timeout=10, max_bytes=1 << 22)
    assert error is None and proof["tip"] == [301, more.tip_digest]


def test_a_dead_averager_process_is_named_not_waited_on() -> None:
    import os
    import signal

    from swarmloco.protocol.transport import SwarmTransport

    cfg = SwarmConfig(host_maddrs=("/ip4/127.0.0.1/tcp/0",))
    transport = SwarmTransport(cfg, prefix="d", templates=[torch.zeros(4)], codec=get_codec(CodecConfig()))
    try:
        assert transport.dead() is None
        os.kill(transport.averager.pid, signal.SIGKILL)
        transport.averager.join(10)
        assert "averager process died" in (transport.dead() or ""), transport.dead()
    finally:
        transport.shutdown()
