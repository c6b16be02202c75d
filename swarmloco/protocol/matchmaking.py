"""The round's group, formed from the members the ready barrier already knows.

hivemind finds a group through the DHT (declare under the round's group key, ask the earliest declared to
lead). After the ready barrier every member knows who is in the round
(:meth:`swarmloco.node.sync.Synchronizer.wait_for_peers`), so those round trips only cost time (0.2-0.35 s of a
blocking round at 2 peers on loopback, BENCHMARKS.md). The members agree on a leader at once instead: the
smallest peer id among those that announce an address (a peer in client mode cannot lead).

* A **follower** asks it directly, again every ``RETRY_S`` while the leader is not looking for a group yet,
  for at most half of ``matchmaking_time`` (a request that reached a live leader keeps the whole
  ``matchmaking_time``: given up sooner, the leader could count the follower into a group it never learns
  of), then falls back to hivemind's DHT search (a dead leader, or a different barrier view).
* The **leader** declares itself (for members that fall back), accepts the members of its set whatever
  expiration they declared, and follows nobody; the group starts once the barrier's count has joined, or
  when its declaration expires with those that did.

The leader keeps each join stream open after its last message until the follower closes it (at most
``LINGER_S``): p2pd can reset a stream its writer closes first, losing ``BEGIN_ALLREDUCE``. The gate, the
all-reduce and the timeouts are hivemind's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import cancel_and_wait

from swarmloco.protocol.allgather import LINGER_S, connected
from swarmloco.protocol.gate import GatedMatchmaking

logger = logging.getLogger(__name__)

RETRY_S = 0.025
"""A follower asks the expected leader again after this long while the leader is not looking for a group."""
GRACE_S = 0.25
"""A join request to the expected leader is left this long past hivemind's ``request_timeout`` (which ends it
first unless the dial itself hangs: a leader that died)."""


class SwarmMatchmaking(GatedMatchmaking):
    """:class:`~swarmloco.protocol.gate.GatedMatchmaking` that forms the group from the expected members."""

    expected: frozenset = frozenset()
    leader: PeerID | None = None

    def expect(self, members: Sequence[str], leader: str | None) -> None:
        """The barrier's ready set for the next round (base58 peer ids, this peer among them) and the leader
        its members agree on (:class:`~swarmloco.node.sync.BarrierResult`); None: hivemind's search alone."""
        members, mine = tuple(members or ()), self.peer_id.to_base58()
        if leader is None or len(members) < 2 or leader not in members or mine not in members or \
                (self.client_mode and leader == mine):  # (a peer nobody can dial leads no group)
            self.expected, self.leader = frozenset(), None
            return
        self.expected = frozenset(PeerID.from_base58(m) for m in members)
        self.leader = PeerID.from_base58(leader)

    async def _request_join_potential_leaders(self, step):
        leader = self.leader
        if leader is not None and leader == self.peer_id:
            # declared (a member that falls back to the DHT search finds it), it follows nobody and waits: the
            # group starts when the barrier's count has joined, or when its declaration expires with those that
            # did. (hivemind's search would also start it early: the first declaration wakes the leader queue
            # as if the time were up, and a member that asked at once would be run in a group without the rest)
            async with self.potential_leaders.begin_search(step, self.group_key_manager, declare=True):
                await asyncio.Event().wait()  # (cancelled when look_for_group ends)
        if leader is not None and leader != self.peer_id and not self.client_mode:
            group = await self._join_expected_leader(step, leader)
            if group is not None:
                return group
            logger.debug("the expected leader %s did not take us in: searching through the DHT",
                         leader.to_base58()[-8:])
            self.expected, self.leader = frozenset(), None
        return await super()._request_join_potential_leaders(step)

    async def _join_expected_leader(self, step, leader: PeerID):
        # the leader's answer gets the whole matchmaking time, not just request_timeout: it leads no one else and
        # asks no one (hivemind's timeout breaks deadlocks of peers that ask each other), and on a loaded machine
        # an answer given up a moment too early leaves this peer counted into a group it never learns of
        patience, self.request_timeout = self.request_timeout, max(self.request_timeout, self.min_matchmaking_time)
        try:
            return await self._ask_expected_leader(step, leader)
        finally:
            self.request_timeout = patience

    async def _ask_expected_leader(self, step, leader: PeerID):
        deadline = time.monotonic() + self.min_matchmaking_time / 2
        if step.deadline is not None:
            deadline = min(deadline, time.monotonic() + max(0.0, step.get_timeout() or 0.0))
        while time.monotonic() < deadline and self.leader == leader:
            # dialling a peer that died takes ~11 s in libp2p: the wait for an answer is bounded by this phase's
            # deadline; once the leader took us in, hivemind's own timeouts bound the wait for the group
            sent = time.monotonic()
            join = asyncio.ensure_future(self._request_join_group(leader))
            await asyncio.wait({join}, timeout=max(0.0, deadline - sent))
            unanswered = not join.done() and not self.was_accepted_to_group.is_set()
            if unanswered and await connected(self._p2p, leader, if_unknown=False):
                # a live leader answers a request that reached it (or hivemind gives it up) within request_timeout:
                # cancelled sooner, the leader could count this peer in all the same. A leader that died is not
                # connected: waiting on its dial would only stall the round
                patience = sent + self.request_timeout + GRACE_S - time.monotonic()
                await asyncio.wait({join}, timeout=max(0.0, patience))
            if not join.done() and not self.was_accepted_to_group.is_set():
                await cancel_and_wait(join)
                self.join_timed_out = True  # (see SwarmAverager.rpc_aggregate_part)
                return None
            group = await join
            if group is not None:
                return group
            await asyncio.sleep(RETRY_S)
        return None

    async def rpc_join_group(self, request, context):
        answered = False
        async for message in super().rpc_join_group(request, context):
            answered = True
            yield message
        task = asyncio.current_task()
        if answered and not (task is not None and task.cancelling()):  # (cancelled: the follower is gone)
            # the follower closes the stream once it has read our last message; hivemind's stream handler
            # cancels this wait at that close
            await asyncio.sleep(LINGER_S)

    def _check_reasons_to_reject(self, request, context):
        reason = super()._check_reasons_to_reject(request, context)
        if reason is None or reason.code != averaging_pb2.BAD_EXPIRATION_TIME:
            return reason
        if self.leader != self.peer_id or context.remote_id not in self.expected:
            return reason
        # an expected member may join its expected leader whatever expiration it declared; the checks that
        # hivemind makes after the expiration one still apply
        if self.current_leader is not None:
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.NOT_A_LEADER,
                                                   suggested_leader=self.current_leader.to_bytes())
        if context.remote_id == self.peer_id or context.remote_id in self.current_followers:
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.DUPLICATE_PEER_ID)
        if self.target_group_size is not None and len(self.current_followers) + 1 >= self.target_group_size:
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.GROUP_IS_FULL)
        return None


__all__ = ["GRACE_S", "RETRY_S", "SwarmMatchmaking"]
