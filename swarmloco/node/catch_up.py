"""Catching up with the swarm: claims verified in the background, the heaviest lineage adopted.

A heartbeat's outer step and digest are a **claim**, never proof: a peer does not stop training, skip a round
or download anything because of one. Each claim that is not a point of this peer's chain is checked here, in
a thread of its own, while training goes on (ARCHITECTURE.md, "Catching up"): ask a holder for its **proof**
(``Transport.fetch_lineage``: its certificates since the newest point it shares with this chain), verify it
(:func:`~swarmloco.protocol.certificates.check_segment`, through the claimed step and digest), and weigh it
against this chain since the fork (:func:`~swarmloco.node.lineage.compare`). A lighter or equal lineage is
only remembered; a heavier one has its state downloaded and checked (its digest must be on the proven chain)
*before* the training loop hears of it: the loop then drops its unfinished inner work and adopts it.

A claimer that serves an invalid proof, keeps heartbeating a claim its proof does not hold, or serves none
while it keeps heartbeating (two tries a heartbeat period apart), is excluded like a cheater
(``swarm.exclude_rounds``); a peer that only died is not blamed. The ready barrier asks for a verdict on its
recent group mates' claims before it forms a round (a few seconds at most), so a survivor adopts its mates'
state at once instead of averaging alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from swarmloco.config import SwarmConfig
from swarmloco.node.lineage import Chain, Comparison, Counts, compare
from swarmloco.node.state_sync import DIGEST_CHARS, SERVING_STATES, AdoptedState, StateError, state_bytes, unpack_state
from swarmloco.protocol.certificates import Certificate, CertificateError, check_segment
from swarmloco.protocol.progress import PeerProgress
from swarmloco.protocol.interface import Transport

logger = logging.getLogger(__name__)

MAX_CLAIMS = 4
"""Claims verified per pass (most held first): a flood of fake ones cannot hold a pass up for long."""
MAX_HOLDERS = 3
"""Holders of one claim asked for its proof, one after another."""
RECHECK_BEATS = 2
"""A claim judged lighter is weighed again after this many heartbeat periods (signatures still spreading)."""
PROOF_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class Claim:
    """A lineage point (outer step, digest prefix) some live peers heartbeat, and who they are."""

    step: int
    digest: str
    holders: tuple[str, ...]

    @property
    def key(self) -> tuple[int, str]:
        return self.step, self.digest


@dataclass(frozen=True)
class Pending:
    """A heavier lineage, proven, with its state downloaded and checked: ready to adopt."""

    chain: Chain
    comparison: Comparison
    state: AdoptedState
    who: str
    bytes: int
    seconds: float


def claims_in(peers: Sequence[PeerProgress], chain: Chain, skip: Callable[[tuple[int, str]], bool]) -> list[Claim]:
    """Lineage points that live peers claim and this peer's chain does not hold (most held first)."""
    groups: dict[tuple[int, str], list[PeerProgress]] = {}
    for p in peers:
        if p.state not in SERVING_STATES or len(p.digest) < DIGEST_CHARS:
            continue
        key = (p.outer_step, p.digest[:DIGEST_CHARS])
        if chain.holds(*key) or skip(key):
            continue
        groups.setdefault(key, []).append(p)
    out = []
    for (step, digest), holders in groups.items():
        holders.sort(key=lambda p: (p.state == "averaging", p.peer_id))  # not busy averaging first
        out.append(Claim(step, digest, tuple(p.peer_id for p in holders)))
    return sorted(out, key=lambda c: (-len(c.holders), -c.step, c.digest))


class CatchUp:
    """Verifies claims and prepares adoptions for one peer (see the module doc)."""

    def __init__(self, *, manifest: str, transport: Transport, cfg: SwarmConfig, snapshot: Callable[[], Chain],
                 counts: Counts, fetch: Callable[[], list[PeerProgress]], blame: Callable[[str, str], None],
                 templates: Sequence[torch.Tensor], download_sources: int, stop: threading.Event,
                 clock: Callable[[], float] = time.time):
        """``snapshot()``: a copy of this peer's chain; ``fetch()``: live, admitted heartbeats now;
        ``blame(peer_id, why)``: exclude a peer that failed a check."""
        self.manifest, self.transport, self.cfg = manifest, transport, cfg
        self.snapshot, self.counts, self.fetch, self.blame = snapshot, counts, fetch, blame
        self.templates, self.download_sources, self.stop, self.clock = templates, download_sources, stop, clock
        self._judged: dict[tuple[int, str], tuple[str, float]] = {}  # claim -> ("lighter" | "unproven", until)
        self._pending: Pending | None = None
        self._view: list[PeerProgress] = []
        self._wake = threading.Event()
        self._check_lock = threading.Lock()
        self.paused: Callable[[], bool] = lambda: False
        """While True (this peer is inside a round) the background pass waits: its mates' claims of the
        next step are then just the round ending, not news."""
        self._thread: threading.Thread | None = None

    # ----- the background thread -----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="catch-up", daemon=True)
        self._thread.start()

    def offer(self, peers: Sequence[PeerProgress]) -> None:
        """The latest heartbeats (from the heartbeat thread or the barrier)."""
        self._view = list(peers)
        self._wake.set()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self.stop.is_set() or self.paused() or self._pending is not None:
                continue
            try:
                self.check(self._view)
            except Exception as e:  # noqa: BLE001 - a bug here must not end catching up for good
                logger.warning("checking the swarm's lineages failed: %s", e, exc_info=logger.isEnabledFor(10))

    # ----- what the training loop and the barrier ask --------------------------------------------
    @property
    def pending(self) -> Pending | None:
        return self._pending

    def take(self, mine: Chain) -> Pending | None:
        """The pending adoption, if it still outweighs this peer's chain as it is now."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        now = compare(mine, pending.chain, self.counts)
        if now is None or not now.theirs_heavier:
            logger.debug("dropping a prepared adoption of outer step %d: this peer's chain caught up",
                         pending.state.outer_step)
            return None
        return Pending(pending.chain, now, pending.state, pending.who, pending.bytes, pending.seconds)

    def unjudged(self, peers: Sequence[PeerProgress], among: set[str]) -> bool:
        """Whether a peer in ``among`` claims a lineage point not yet judged (a verdict is due)."""
        mine = self.snapshot()
        return any(set(c.holders) & among for c in claims_in(peers, mine, self._is_judged))

    def _is_judged(self, key: tuple[int, str]) -> bool:
        """A verdict on this claim stands: "unproven" for good, "lighter" for ``RECHECK_BEATS`` heartbeat periods
        (its holders' signatures of their rounds spread with their heartbeats: a round just committed is often
        judged before its members' signatures reached its holders, so a tie must be weighed again)."""
        verdict = self._judged.get(key)
        return verdict is not None and (verdict[0] == "unproven" or self.clock() < verdict[1])

    def forget(self) -> None:
        """This peer's chain changed (it adopted another): earlier verdicts were relative to the old one."""
        self._judged.clear()

    # ----- one pass ------------------------------------------------------------------------------
    def check(self, peers: Sequence[PeerProgress]) -> Pending | None:
        """Verify the new claims among ``peers``; prepare the heaviest one that outweighs this peer's."""
        with self._check_lock:
            if self._pending is not None:
                return self._pending
            mine = self.snapshot()
            best: tuple[Chain, Comparison, Claim] | None = None
            for claim in claims_in(peers, mine, self._is_judged)[:MAX_CLAIMS]:
                found = self._verify(claim, mine)
                if found is None:
                    continue
                chain, comparison = found
                if best is None or (compare(best[0], chain, self.counts) or comparison).theirs_heavier:
                    best = (chain, comparison, claim)
            if best is not None:
                self._pending = self._download(*best)
            return self._pending

    def _verify(self, claim: Claim, mine: Chain) -> tuple[Chain, Comparison] | None:
        for holder in claim.holders[:MAX_HOLDERS]:
            chain, why, blameless = self._proof(holder, claim, mine)
            if chain is None and blameless:  # unreachable and not heartbeating: a peer that died
                continue
            if chain is None:
                self.blame(holder, f"its claim of outer step {claim.step} (digest {claim.digest}) failed the "
                                   f"check: {why}")
                continue
            comparison = compare(mine, chain, self.counts)
            if comparison is None or not comparison.theirs_heavier:
                self._judged[claim.key] = ("lighter", self.clock() + RECHECK_BEATS * self.cfg.heartbeat_period)
                if comparison is not None:
                    logger.info("the lineage of outer step %d held by %s is lighter than this peer's since outer "
                                "step %d (%s vs %s): keeping ours", claim.step, _brief(claim.holders),
                                comparison.fork, comparison.theirs.brief(), comparison.mine.brief())
                return None
            return chain, comparison
        self._judged[claim.key] = ("unproven", float("inf"))
        return None

    def _proof(self, holder: str, claim: Claim, mine: Chain) -> tuple[Chain | None, str, bool]:
        """(the holder's chain, proven to go through the claim) or (None, why, whether blameless)."""
        failed_at, why, unreachable = 0.0, "", False
        for attempt in range(2):
            if attempt:  # a second chance a heartbeat period later: it may have just moved on, or died
                if self.stop.wait(1.5 * self.cfg.heartbeat_period):
                    return None, "stopping", True
                still = next((p for p in self.fetch() if p.peer_id == holder), None)
                if still is None or (unreachable and still.time <= failed_at):
                    return None, why, True  # gone (or silent since it did not answer): nothing left to check
                if (still.outer_step, still.digest[:DIGEST_CHARS]) != claim.key:
                    return None, why, True  # it moved on: its new claim gets its own check
            failed_at = self.clock()
            proof, error = self.transport.fetch_lineage(holder, mine.locator(), timeout=self.cfg.request_timeout * 3,
                                                        max_bytes=PROOF_MAX_BYTES)
            unreachable = proof is None
            if proof is None:
                why = f"served no proof ({error})"
                continue
            try:
                chain = self._chain_of(proof, mine)
            except (CertificateError, KeyError, TypeError, ValueError) as e:
                return None, f"its proof is invalid: {e}", False  # no honest peer serves one
            if chain.holds(*claim.key):
                return chain, "", False
            why = (f"its proof reaches outer step {chain.tip_step} (digest {chain.tip_digest.hex()[:DIGEST_CHARS]}) "
                   "without the claimed one")
        return None, why, False

    def _chain_of(self, proof: dict, mine: Chain) -> Chain:
        start = proof["from"]
        if start is None:
            raise CertificateError("it shares no point with this peer's chain (another genesis?)")
        start_step, start_digest = int(start[0]), bytes(start[1])
        if mine.digest_at(start_step) != start_digest:
            raise CertificateError(f"it starts from outer step {start_step}, which is not on this peer's chain")
        certs = [Certificate.decode(raw) for raw in proof["certs"]]
        check_segment(certs, start_step=start_step, start_digest=start_digest, manifest=self.manifest)
        return mine.extended(start_step, certs)

    def _download(self, chain: Chain, comparison: Comparison, claim: Claim) -> Pending | None:
        """The state of the proven lineage from its holders; None (and nothing blamed) if none served it."""
        max_bytes = int(state_bytes(self.templates) * 1.05) + (1 << 20)
        sources = list(claim.holders)
        tries = [(sources, self.download_sources)] if self.download_sources > 1 and len(sources) > 1 else []
        tries += [([s], 1) for s in sources]
        errors: list[str] = []
        for group, parallel in tries:
            got, errs = self.transport.download_state(group, timeout=self.cfg.state_timeout, max_bytes=max_bytes,
                                                      parallel=parallel)
            errors += errs
            if got is None:
                continue
            who = f"peer {got.peer_id[-8:]}" if len(got.sources) <= 1 else f"{len(got.sources)} peers"
            try:
                state = unpack_state(got.metadata, got.tensors, manifest_hash=self.manifest, templates=self.templates)
                proven = chain if chain.holds(state.outer_step, state.digest[:DIGEST_CHARS]) else \
                    self._reprove(got.peer_id, state, chain)
            except (StateError, CertificateError) as e:
                logger.error("state from %s rejected: %s", who, e)
                errors.append(f"{who}: {e}")
                continue
            proven = Chain(proven.manifest, proven.root_step, proven.root_digest,
                           proven.certs[:state.outer_step - proven.root_step])
            return Pending(proven, comparison, state, who, got.bytes, got.seconds)
        logger.warning("could not download the state of the lineage at outer step %d: %s", claim.step,
                       "; ".join(errors) or "no source")
        return None

    def _reprove(self, peer_id: str, state: AdoptedState, chain: Chain) -> Chain:
        """The source moved on since its proof: its state must be on a chain it proves now."""
        proof, error = self.transport.fetch_lineage(peer_id, chain.locator(), timeout=self.cfg.request_timeout * 3,
                                                    max_bytes=PROOF_MAX_BYTES)
        if proof is None:
            raise CertificateError(f"no proof for the state it served at outer step {state.outer_step}: {error}")
        longer = self._chain_of(proof, chain)
        if not longer.holds(state.outer_step, state.digest[:DIGEST_CHARS]):
            raise CertificateError(f"the state it served (outer step {state.outer_step}) is not on its lineage")
        return longer


def _brief(peer_ids: Sequence[str]) -> str:
    names = ", ".join(p[-8:] for p in peer_ids[:3])
    return names + (f" and {len(peer_ids) - 3} more" if len(peer_ids) > 3 else "")


__all__ = ["CatchUp", "Claim", "Pending", "claims_in"]
