"""Rejoining the DHT after this node fell out of everyone's routing table, itself included.

hivemind's DHT (Kademlia) drops a node from its routing table when a request to it goes unanswered, learns
nodes only from traffic, and bootstraps from ``initial_peers`` only at start. A peer frozen longer than its
mates' request timeouts (a closed laptop lid: SIGSTOP to its whole process group, p2pd included; a network
gone away) wakes with an empty routing table and absent from its mates' tables: nobody sends anybody a
request, so it would train alone for good.

:class:`Rejoiner` checks, at most every ``REJOIN_PERIOD`` seconds and without blocking its caller (the
heartbeat's DHT reads call it), whether the routing table is empty; if so it dials and pings the initial
peers again (which puts them in its table and it in theirs) and looks itself up to learn their neighbours,
as hivemind's bootstrap does. It also pings the last ``KNOWN_PEERS`` peers its table held (p2pd still knows
their addresses), so the swarm's first peer, which has no initial peers, finds its way back too.
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


async def rejoin_if_isolated(dht: Any, node: Any, maddrs: Sequence[str], timeout: float = REJOIN_TIMEOUT) -> int:
    """Run inside the DHT process (``DHT.run_coroutine``): with an empty routing table, dial and ping the
    initial peers ``maddrs`` and the peers the table held before; otherwise remember those. Returns how many
    answered (0: none did, or the table was not empty)."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    known: dict = node.__dict__.setdefault("_swarmloco_known_peers", {})  # peer id -> None, newest last
    table = node.protocol.routing_table.uid_to_peer_id
    if table:
        for peer in table.values():
            known.pop(peer, None)
            known[peer] = None
        while len(known) > KNOWN_PEERS:
            known.pop(next(iter(known)))
        return 0

    async def ping(peer: Any) -> bool:
        with contextlib.suppress(Exception):
            return await asyncio.wait_for(node.protocol.call_ping(peer, validate=False), timeout) is not None
        return False

    async def dial(maddr: Multiaddr) -> bool:
        peer = PeerID.from_base58(maddr["p2p"])
        with contextlib.suppress(Exception):  # an address p2pd still knows is dialled anyway by the ping
            await asyncio.wait_for(node.p2p._client.connect(peer, [maddr]), timeout)
        return await ping(peer)

    targets = []
    for text in maddrs:
        with contextlib.suppress(Exception):  # (the config validated them; a bad one is skipped)
            targets.append(Multiaddr(text))
    dialled = {m["p2p"] for m in targets}
    answered = sum(await asyncio.gather(*(dial(m) for m in targets),
                                        *(ping(p) for p in list(known) if p.to_base58() not in dialled)))
    if answered:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(node.find_nearest_nodes([node.node_id]), timeout)
    return answered


class Rejoiner:
    """Polled by a DHT user; see the module doc."""

    def __init__(self, dht: Any, initial_peers: Sequence[str], period: float = REJOIN_PERIOD):
        self.dht, self.maddrs, self.period = dht, tuple(str(m) for m in initial_peers), period
        self.rejoined = 0
        """How many times the node found itself isolated and rejoined (for logs and tests)."""
        self._next = time.monotonic() + period
        self._pending: Any = None

    def poll(self) -> None:
        if self.dht is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.period
        if self._pending is not None:
            if not self._pending.done():
                return
            answered = 0
            with contextlib.suppress(Exception):
                answered = self._pending.result(timeout=0)
            if answered:
                self.rejoined += 1
                logger.warning("this node had dropped out of the DHT (frozen or offline longer than its mates "
                               "waited): rejoined it through %d peer(s)", answered)
        try:
            self._pending = self.dht.run_coroutine(partial(rejoin_if_isolated, maddrs=self.maddrs),
                                                   return_future=True)
        except Exception as e:  # noqa: BLE001 - the DHT process is gone or stopping: nothing to rejoin
            logger.debug("rejoin check failed: %s", e)
            self._pending = None
