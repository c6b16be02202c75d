"""Who may average with this peer: access control and exclusion at matchmaking.

The node decides (access tokens read from the DHT, peers caught sending invalid or far-too-large updates)
and pushes its decision into the averager process as a :class:`Gate`, which hivemind's matchmaking consults
wherever a peer can get into a group:

* as a **leader**, a join request from a refused peer is answered ``PROTOCOL_VIOLATION`` (hivemind's
  "go away" code), so it never enters the group this peer assembles;
* as a **follower**, a refused peer is never asked to lead (it is skipped in the leader queue);
* a group a leader assembled with a refused member is not run (the round fails for this peer).

In a private run, state downloads are refused to peers without a token too (the model is private); excluded
peers may still download (an honest peer with a bug must be able to catch up). libp2p authenticates every
connection (Noise) as its peer id, which inlines the Ed25519 public key
(:func:`~swarmloco.protocol.identity.public_key_of_peer_id`), so a token's key is the key the connection holds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from hivemind.averaging.matchmaking import Matchmaking, MatchmakingException
from hivemind.proto import averaging_pb2

from swarmloco.protocol.identity import public_key_of_peer_id

logger = logging.getLogger(__name__)


@dataclass
class Gate:
    """The averager process's copy of the node's admission decisions (mutable: updated in place)."""

    private: bool = False
    """Only peers whose public key is in ``admitted`` may take part."""
    admitted: frozenset[bytes] = frozenset()
    excluded: frozenset[str] = frozenset()
    """Base58 peer ids refused for now (invalid or clipped contributions)."""
    _refusals: set[tuple[str, str]] = field(default_factory=set)

    def update(self, private: bool, admitted: frozenset[bytes], excluded: frozenset[str]) -> None:
        self.private, self.admitted, self.excluded = bool(private), frozenset(admitted), frozenset(excluded)

    def may_join(self, peer_id: Any) -> bool:
        """May ``peer_id`` (a hivemind PeerID) be in a group with this peer?"""
        return self._peer_str(peer_id) not in self.excluded and self.may_download(peer_id)

    def may_download(self, peer_id: Any) -> bool:
        """May ``peer_id`` download this peer's state (private runs: token holders only)?"""
        if not self.private:
            return True
        key = public_key_of_peer_id(peer_id.to_bytes())
        return key is not None and key in self.admitted

    def note_refusal(self, peer_id: Any, where: str) -> None:
        name = self._peer_str(peer_id)
        if (name, where) not in self._refusals:  # once per peer and place, not at every request
            if len(self._refusals) < 4096:  # bounded: a flood of fresh peer ids must not grow it forever
                self._refusals.add((name, where))
            reason = "excluded" if name in self.excluded else "no valid access token"
            logger.info("refused peer %s %s: %s", name[-8:], where, reason)

    @staticmethod
    def _peer_str(peer_id: Any) -> str:
        return peer_id.to_base58() if hasattr(peer_id, "to_base58") else str(peer_id)


class GatedMatchmaking(Matchmaking):
    """hivemind's Matchmaking, consulting ``self.gate`` (set by :func:`gate_matchmaking`)."""

    gate: Gate

    def _check_reasons_to_reject(self, request, context):
        if not self.gate.may_join(context.remote_id):
            self.gate.note_refusal(context.remote_id, "at matchmaking")
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
        return super()._check_reasons_to_reject(request, context)

    async def look_for_group(self, step):
        self.join_timed_out = False
        return await super().look_for_group(step)

    async def _request_join_group(self, leader):
        if not self.gate.may_join(leader):
            self.gate.note_refusal(leader, "as a group leader")
            return None
        started = time.monotonic()
        group = await super()._request_join_group(leader)
        if group is not None:
            self.join_timed_out = False
        elif time.monotonic() - started >= self.request_timeout:
            # no answer in time: the leader may have counted this peer in all the same (it then runs a group
            # this peer never learns of; see SwarmAverager.rpc_aggregate_part)
            self.join_timed_out = True
        return group

    async def follower_assemble_group(self, leader, msg):
        group = await super().follower_assemble_group(leader, msg)
        refused = [p for p in group.peer_ids if not self.gate.may_join(p)]
        if refused:
            for p in refused:
                self.gate.note_refusal(p, "in a group its leader assembled")
            raise MatchmakingException(f"leader {leader.to_base58()[-8:]} put refused peer(s) "
                                       f"{', '.join(p.to_base58()[-8:] for p in refused)} in the group")
        return group


def gate_matchmaking(matchmaking: Matchmaking, gate: Gate) -> Matchmaking:
    """Make hivemind's Matchmaking instance consult ``gate``.

    DecentralizedAverager builds its Matchmaking inside its own process with no hook for the class, so
    the instance is switched to the subclass, which only overrides methods and adds two attributes."""
    matchmaking.__class__ = GatedMatchmaking
    matchmaking.gate = gate
    matchmaking.join_timed_out = False  # a join request of this round got no answer in time (none succeeded since)
    return matchmaking


__all__ = ["Gate", "GatedMatchmaking", "gate_matchmaking"]
