"""A node that dropped out of the DHT (its routing table emptied, and out of its mates' tables: what a
freeze longer than their request timeouts leaves) rejoins through its initial peers, or through the peers
it knew (the swarm's first peer has no initial peers)."""

from __future__ import annotations

import time
from functools import partial

import pytest

from swarmloco.config import SwarmConfig
from swarmloco.protocol.rejoin import Rejoiner, rejoin_if_isolated
from swarmloco.protocol.transport import DhtClient

pytestmark = pytest.mark.slow

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


async def _forget(dht, node, peer_ids=None) -> int:
    """Drop nodes from the routing table as unanswered requests do (all, or those of ``peer_ids``)."""
    table = node.protocol.routing_table
    for node_id, peer_id in list(table.uid_to_peer_id.items()):
        if peer_ids is None or peer_id.to_base58() in peer_ids:
            del table[node_id]
    return len(table.uid_to_peer_id)


async def _knows(dht, node, peer_id: str) -> bool:
    return any(p.to_base58() == peer_id for p in node.protocol.routing_table.uid_to_peer_id.values())


def _until(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


@pytest.fixture
def pair():
    a = DhtClient(SwarmConfig(host_maddrs=LOOPBACK))
    maddrs = a.visible_maddrs()
    b = DhtClient(SwarmConfig(host_maddrs=LOOPBACK, initial_peers=tuple(maddrs[:1])))
    try:
        yield a, b, maddrs[:1]
    finally:
        b.shutdown()
        a.shutdown()


def _polled(rejoiner: Rejoiner, counter: str):
    """A predicate for ``_until``: poll ``rejoiner`` once, then whether its ``counter`` moved."""
    def moved() -> bool:
        rejoiner.poll()
        return getattr(rejoiner, counter) > 0

    return moved


def _isolate(a: DhtClient, b: DhtClient) -> None:
    assert b.dht.run_coroutine(_forget) == 0
    a.dht.run_coroutine(partial(_forget, peer_ids={b.peer_id}))


def test_an_isolated_node_rejoins_through_its_initial_peers_and_sees_the_swarm_again(pair) -> None:
    a, b, maddrs = pair
    assert a.store("before", "a", b"1", time.time() + 60)
    assert _until(lambda: b.get("before")) == {"a": b"1"}  # connected

    _isolate(a, b)
    assert a.store("after", "a", b"2", time.time() + 60)
    assert b.get("after") == {}  # isolated: nobody to ask, and nobody tells it anything
    assert not a.dht.run_coroutine(partial(_knows, peer_id=b.peer_id))

    assert b.dht.run_coroutine(partial(rejoin_if_isolated, maddrs=maddrs)) == 1
    assert _until(lambda: b.get("after")) == {"a": b"2"}
    assert a.dht.run_coroutine(partial(_knows, peer_id=b.peer_id)), "its mate should know it again"
    assert b.dht.run_coroutine(partial(rejoin_if_isolated, maddrs=maddrs)) == 0  # not isolated: nothing done


def test_the_poller_notices_isolation_by_itself(pair) -> None:
    a, b, maddrs = pair
    assert _until(lambda: b.dht.run_coroutine(partial(_knows, peer_id=a.peer_id)))
    _isolate(a, b)
    rejoiner = Rejoiner(b.dht, maddrs, period=0.2)
    assert _until(_polled(rejoiner, "rejoined")), "the poller should have found the node isolated and rejoined"
    assert a.dht.run_coroutine(partial(_knows, peer_id=b.peer_id))


def test_the_first_peer_without_initial_peers_rejoins_through_the_peers_it_knew(pair) -> None:
    """The swarm's first peer has no initial peers: it remembers whom its table held and pings them."""
    a, b, _ = pair
    assert _until(lambda: a.dht.run_coroutine(partial(_knows, peer_id=b.peer_id)))
    assert a.dht.run_coroutine(partial(rejoin_if_isolated, maddrs=())) == 0  # connected: it notes b
    assert a.dht.run_coroutine(_forget) == 0
    b.dht.run_coroutine(partial(_forget, peer_ids={a.peer_id}))
    assert b.store("after", "b", b"3", time.time() + 60)
    assert a.get("after") == {}  # isolated

    rejoiner = Rejoiner(a.dht, (), period=0.2)
    assert _until(_polled(rejoiner, "rejoined")), "the first peer should have rejoined through the peer it knew"
    assert _until(lambda: a.get("after")) == {"b": b"3"}
    assert b.dht.run_coroutine(partial(_knows, peer_id=a.peer_id)), "its mate should know it again"


def test_a_node_that_never_knew_anyone_has_nothing_to_rejoin() -> None:
    lone = DhtClient(SwarmConfig(host_maddrs=LOOPBACK))
    try:
        assert lone.dht.run_coroutine(partial(rejoin_if_isolated, maddrs=())) == 0
    finally:
        lone.shutdown()


def test_islands_that_share_an_initial_peer_become_one_dht_again() -> None:
    """Newcomers that joined through the first peer while it was too busy to answer know each other but not it,
    and it knows nobody: every table but one is non-empty, so nobody is "isolated". Their periodic ping of the
    initial peer missing from their table joins the islands: the first peer then reads what both stored."""
    first = DhtClient(SwarmConfig(host_maddrs=LOOPBACK))
    maddrs = first.visible_maddrs()[:1]
    b = DhtClient(SwarmConfig(host_maddrs=LOOPBACK, initial_peers=tuple(maddrs)))
    c = DhtClient(SwarmConfig(host_maddrs=LOOPBACK, initial_peers=tuple(maddrs)))
    try:
        for client in (first, b, c):
            client._rejoiner.dht = None  # (only the poller under test acts)
        assert _until(lambda: b.dht.run_coroutine(partial(_knows, peer_id=c.peer_id))
                      and c.dht.run_coroutine(partial(_knows, peer_id=b.peer_id)))
        assert first.dht.run_coroutine(_forget) == 0
        for newcomer in (b, c):
            assert newcomer.dht.run_coroutine(partial(_forget, peer_ids={first.peer_id})) >= 1
        assert b.store("islands", "b", b"1", time.time() + 60) and c.store("islands", "c", b"2", time.time() + 60)
        assert first.get("islands") == {}  # two islands: the first peer and the newcomers
        assert b.dht.run_coroutine(partial(rejoin_if_isolated, maddrs=maddrs)) == 0  # not isolated: no rejoin

        rejoiner = Rejoiner(b.dht, maddrs, period=0.2, reach_period=0.2)
        assert _until(_polled(rejoiner, "reached")), \
            "the newcomer should have pinged its initial peer missing from its table"
        assert rejoiner.rejoined == 0
        assert _until(lambda: first.get("islands") == {"b": b"1", "c": b"2"}), first.get("islands")
    finally:
        for client in (c, b, first):
            client.shutdown()


def test_the_first_peer_whose_table_never_held_anyone_rejoins_through_the_peers_connected_to_it(pair) -> None:
    """The swarm's first peer, too busy to answer the newcomers' first requests, may never have had them in its
    table: with no initial peers and nobody remembered, it pings the peers p2pd is connected to (they joined
    through it) and reads the swarm again."""
    a, b, _ = pair
    a._rejoiner.dht = b._rejoiner.dht = None  # (only the poller under test acts)
    assert _until(lambda: b.dht.run_coroutine(partial(_knows, peer_id=a.peer_id)))
    assert a.dht.run_coroutine(_forget) == 0  # before any check noted whom its table held
    b.dht.run_coroutine(partial(_forget, peer_ids={a.peer_id}))
    assert b.store("after", "b", b"4", time.time() + 60)
    assert a.get("after") == {}  # isolated, and it remembers nobody

    rejoiner = Rejoiner(a.dht, (), period=0.2)
    assert _until(_polled(rejoiner, "rejoined")), \
        "the first peer should have rejoined through the peer connected to it"
    assert _until(lambda: a.get("after")) == {"b": b"4"}
