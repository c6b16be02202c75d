"""Rejoining the DHT after this node fell out of everyone's routing table, itself included.

hivemind's DHT (Kademlia) drops a node from its routing table when a request to it goes unanswered, learns
nodes only from traffic, and bootstraps from ``initial_peers`` only at start. A peer frozen longer than its
mates' request timeouts (a closed laptop lid: SIGSTOP to its whole process group, p2pd included; a network
gone away) wakes with an empty routing table and absent from its mates' tables: nobody sends anybody a
request, so it would train alone for good.

:class:`Rejoiner` checks, at most every ``REJOIN_PERIOD`` seconds and without blocking its caller (the
heartbeat's DHT reads call it), whether the routing table is empty; if so it dials and pings the initial
peers again (which puts them in its table and it in theirs) and looks itself up to learn their neighbours,
as hivemind's bootstrap does. It also pings the last ``KNOWN_PEERS`` peers its table held and the peers
p2pd is connected to (those that joined through it), so the swarm's first peer, which has no initial peers,
finds its way back too, even when its table never held anyone.

A DHT can also split into islands with every table non-empty: newcomers that joined through the first peer
while it was too busy to answer know each other but not it, and it knows none of them. So every
``REACH_PERIOD`` seconds a node also pings those of its initial peers missing from its table
(:func:`reach_missing_initial_peers`): the ping puts each in the other's table, and the islands that share
an initial peer become one DHT again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

logger = logging.getLogger(__name__)

REJOIN_PERIOD = 2.0
"""Seconds between two checks of the routing table (each is one message to the DHT process)."""
KNOWN_PEERS = 32
"""How many of the peers its routing table held a node remembers, to ping when it finds itself isolated."""
REJOIN_TIMEOUT = 5.0
"""Bound on each dial, ping and lookup of a rejoin (a dead initial peer's dial would take ~11 s)."""
REACH_PERIOD = 10.0
"""Seconds between two pings of the initial peers missing from a routing table that is not empty."""


def _multiaddrs(maddrs: Sequence[str]) -> list:
    from hivemind.utils.multiaddr import Multiaddr

    targets = []
    for text in maddrs:
        with contextlib.suppress(Exception):  # (the config validated them; a bad one is skipped)
            targets.append(Multiaddr(text))
    return targets


async def _ping(node: Any, peer: Any, timeout: float) -> bool:
    with contextlib.suppress(Exception):
        return await asyncio.wait_for(node.protocol.call_ping(peer, validate=False), timeout) is not None
    return False


async def _dial(node: Any, maddr: Any, timeout: float) -> bool:
    from hivemind.p2p import PeerID

    peer = PeerID.from_base58(maddr["p2p"])
    with contextlib.suppress(Exception):  # an address p2pd still knows is dialled anyway by the ping
        await asyncio.wait_for(node.p2p._client.connect(peer, [maddr]), timeout)
    return await _ping(node, peer, timeout)


async def _look_around(node: Any, timeout: float) -> None:
    """Look this node up, as hivemind's bootstrap does: it learns the neighbours of those it reached."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(node.find_nearest_nodes([node.node_id]), timeout)


async def rejoin_if_isolated(dht: Any, node: Any, maddrs: Sequence[str], timeout: float = REJOIN_TIMEOUT) -> int:
    """Run inside the DHT process (``DHT.run_coroutine``): with an empty routing table, dial and ping the
    initial peers ``maddrs`` and the peers the table held before; otherwise remember those. Returns how many
    answered (0: none did, or the table was not empty)."""
    known: dict = node.__dict__.setdefault("_swarmloco_known_peers", {})  # peer id -> None, newest last
    table = node.protocol.routing_table.uid_to_peer_id
    if table:
        for peer in table.values():
            known.pop(peer, None)
            known[peer] = None
        while len(known) > KNOWN_PEERS:
            known.pop(next(iter(known)))
        return 0
    targets = _multiaddrs(maddrs)
    dialled = {m["p2p"] for m in targets}
    others = list(known)
    with contextlib.suppress(Exception):  # peers p2pd is connected to: those that joined through this node
        others += [info.peer_id for info in await asyncio.wait_for(node.p2p.list_peers(), timeout)]
    others = [p for p in dict.fromkeys(others) if p.to_base58() not in dialled and p != node.p2p.peer_id]
    answered = sum(await asyncio.gather(*(_dial(node, m, timeout) for m in targets),
                                        *(_ping(node, p, timeout) for p in others)))
    if answered:
        await _look_around(node, timeout)
    return answered


async def reach_missing_initial_peers(dht: Any, node: Any, maddrs: Sequence[str], timeout: float = REJOIN_TIMEOUT,
                                      period: float = REACH_PERIOD) -> int:
    """Run inside the DHT process: at most every ``period`` seconds, with a routing table that is not empty,
    dial and ping the initial peers missing from it. Returns how many of them answered."""
    table = node.protocol.routing_table.uid_to_peer_id
    now = time.monotonic()
    if not table or now < node.__dict__.get("_swarmloco_next_reach", 0.0):
        return 0
    node.__dict__["_swarmloco_next_reach"] = now + period
    present = {p.to_base58() for p in table.values()}
    missing = [m for m in _multiaddrs(maddrs) if m["p2p"] not in present]
    answered = sum(await asyncio.gather(*(_dial(node, m, timeout) for m in missing))) if missing else 0
    if answered:
        await _look_around(node, timeout)
    return answered


async def _check(dht: Any, node: Any, maddrs: Sequence[str], reach_period: float) -> tuple[int, int]:
    """One poll: (peers answered a rejoin of an isolated node, missing initial peers reached)."""
    rejoined = await rejoin_if_isolated(dht, node, maddrs)
    reached = 0 if rejoined else await reach_missing_initial_peers(dht, node, maddrs, period=reach_period)
    return rejoined, reached


class Rejoiner:
    """Polled by a DHT user; see the module doc."""

    def __init__(self, dht: Any, initial_peers: Sequence[str], period: float = REJOIN_PERIOD,
                 reach_period: float = REACH_PERIOD):
        self.dht, self.maddrs, self.period = dht, tuple(str(m) for m in initial_peers), period
        self.reach_period = reach_period
        self.rejoined = 0
        """How many times the node found itself isolated and rejoined (for logs and tests)."""
        self.reached = 0
        """How many times initial peers missing from a non-empty routing table answered (islands joined)."""
        self._next = time.monotonic() + period
        self._pending: Any = None

    def poll(self) -> None:
        if self.dht is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.period
        if self._pending is not None:
            if not self._pending.done():
                return
            rejoined = reached = 0
            with contextlib.suppress(Exception):
                rejoined, reached = self._pending.result(timeout=0)
            if rejoined:
                self.rejoined += 1
                logger.warning("this node had dropped out of the DHT (frozen or offline longer than its mates "
                               "waited): rejoined it through %d peer(s)", rejoined)
            if reached:
                self.reached += 1
                logger.info("reached %d initial peer(s) missing from the DHT routing table", reached)
        try:
            self._pending = self.dht.run_coroutine(partial(_check, maddrs=self.maddrs, reach_period=self.reach_period),
                                                   return_future=True)
        except Exception as e:  # noqa: BLE001 - the DHT process is gone or stopping: nothing to rejoin
            logger.debug("rejoin check failed: %s", e)
            self._pending = None
