"""The fork choice and the catch-up: which lineage a peer follows, proven by certificates, never by claims.

Chains here are real certificate chains over real parameter digests; the "swarm" is a fake transport
that serves each peer's chain (as the averager's ``rpc_lineage_proof`` does, from the newest shared
locator point) and its state.
"""

from __future__ import annotations

import threading
import time

import torch

from swarmloco.config import SwarmConfig
from swarmloco.node.catch_up import CatchUp
from swarmloco.node.lineage import Chain, compare
from swarmloco.node.state_sync import pack_state, params_digest
from swarmloco.protocol.certificates import Certificate, RoundHeader, sign_round
from swarmloco.protocol.identity import Identity
from swarmloco.protocol.lineage_transfer import find_start
from swarmloco.protocol.progress import PeerProgress
from swarmloco.protocol.interface import DownloadedState

MANIFEST = "ab" * 32
KEYS = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(8)]
CFG = SwarmConfig(heartbeat_period=0.05, request_timeout=0.1, state_timeout=1.0)


def params(tag: str, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(hash((tag, step)) % (1 << 31))
    return [torch.randn(3, 2, generator=g), torch.randn(4, generator=g)]


GENESIS = params("genesis", 0)
GENESIS_DIGEST = bytes.fromhex(params_digest(GENESIS))


def grow(chain: Chain, rounds: int, signers: list[Identity], tag: str) -> Chain:
    """``rounds`` more rounds, each signed by all of ``signers`` (a group that trained together)."""
    out = Chain(chain.manifest, chain.root_step, chain.root_digest, chain.certs)
    for _ in range(rounds):
        step = out.tip_step
        header = RoundHeader(manifest=MANIFEST, step=step, parent=out.tip_digest,
                             digest=bytes.fromhex(params_digest(params(tag, step + 1))),
                             members=tuple(sorted(k.public_bytes for k in signers)), samples=64 * len(signers))
        cert = sign_round(header, signers[0])
        for k in signers[1:]:
            cert = cert.with_signature(k.public_bytes, k.sign(header.payload()))
        out.append(cert)
    return out


def genesis() -> Chain:
    return Chain(MANIFEST, 0, GENESIS_DIGEST)


def everyone(_key: bytes) -> bool:
    return True


def test_three_peers_joint_rounds_outweigh_one_peers_many_solo_rounds() -> None:
    swarm = grow(genesis(), 24, KEYS[:3], "swarm")
    loner = grow(genesis(), 60, KEYS[3:4], "loner")
    seen_by_swarm = compare(swarm, loner, everyone)
    assert seen_by_swarm.fork == 0 and not seen_by_swarm.theirs_heavier
    seen_by_loner = compare(loner, swarm, everyone)
    assert seen_by_loner.theirs_heavier and seen_by_loner.dropped_rounds == 60


def test_the_larger_side_of_a_partition_wins_whatever_step_each_reached() -> None:
    shared = grow(genesis(), 5, KEYS[:5], "shared")
    small = grow(shared, 40, KEYS[:2], "small")  # two peers, many short rounds
    large = grow(shared, 10, KEYS[2:5], "large")  # three peers
    assert compare(small, large, everyone).theirs_heavier
    assert not compare(large, small, everyone).theirs_heavier
    assert compare(small, large, everyone).fork == 5


def test_an_even_split_resolves_the_same_way_on_both_sides() -> None:
    shared = grow(genesis(), 3, KEYS[:4], "shared")
    left, right = grow(shared, 4, KEYS[:2], "left"), grow(shared, 4, KEYS[2:4], "right")
    assert compare(left, right, everyone).theirs_heavier != compare(right, left, everyone).theirs_heavier


def test_a_peer_that_is_only_behind_sees_the_swarm_heavier() -> None:
    swarm = grow(genesis(), 6, KEYS[:3], "swarm")
    behind = Chain(MANIFEST, 0, GENESIS_DIGEST, swarm.certs[:4])
    assert compare(behind, swarm, everyone).theirs_heavier
    assert not compare(swarm, behind, everyone).theirs_heavier


def test_excluded_or_unadmitted_signers_do_not_count() -> None:
    shared = grow(genesis(), 2, KEYS[:4], "shared")
    honest = grow(shared, 3, KEYS[:2], "honest")
    sybils = grow(shared, 3, KEYS[4:8], "sybil")  # four keys nobody admitted (a private run)
    admitted = {k.public_bytes for k in KEYS[:4]}
    assert not compare(honest, sybils, admitted.__contains__).theirs_heavier
    assert compare(honest, sybils, everyone).theirs_heavier  # in an open run, keys are cheap: see docs/lineage.md


def test_a_chain_no_counted_member_signed_since_the_fork_is_never_heavier() -> None:
    """A staller this peer excluded keeps committing alone: its chain since the fork proves nothing, however
    long, against this peer's (whose failed round left it nothing since the fork either)."""
    shared = grow(genesis(), 2, KEYS[:4], "shared")
    staller = grow(shared, 5, KEYS[3:4], "staller")
    assert not compare(shared, staller, lambda key: key != KEYS[3].public_bytes).theirs_heavier
    assert compare(shared, staller, everyone).theirs_heavier  # counted, its one signer is a contributor


def test_a_chain_survives_a_checkpoint_and_a_tampered_one_is_refused() -> None:
    chain = grow(genesis(), 3, KEYS[:2], "c")
    again = Chain.from_state(MANIFEST, chain.to_state())
    assert again.tip_digest == chain.tip_digest and [c.encode() for c in again.certs] == [c.encode() for c in chain.certs]
    state = chain.to_state()
    state["certs"] = state["certs"][:1] + state["certs"][2:]
    try:
        Chain.from_state(MANIFEST, state)
    except ValueError as e:
        assert "jumps" in str(e)
    else:
        raise AssertionError("a chain with a round missing was accepted")


def test_the_locator_finds_the_fork_point_with_few_entries() -> None:
    shared = grow(genesis(), 100, KEYS[:2], "shared")
    mine, theirs = grow(shared, 30, KEYS[:1], "mine"), grow(shared, 5, KEYS[1:2], "theirs")
    locator = mine.locator()
    assert len(locator) <= 10 and locator[0] == (130, mine.tip_digest) and locator[-1] == (0, GENESIS_DIGEST)
    start = find_start((0, GENESIS_DIGEST), [c.digest for c in theirs.certs], locator)
    assert start is not None and 100 - 32 <= start[0] <= 100  # at or shortly before the fork


# ----- the catch-up, against a fake swarm -----------------------------------------------------------
class FakeSwarm:
    """Serves each peer's chain (from the newest shared locator point) and state; records what was asked."""

    def __init__(self):
        self.chains: dict[str, Chain] = {}
        self.states: dict[str, tuple[str, int]] = {}  # peer -> (tag, step) of the params it serves
        self.proofs: dict[str, object] = {}  # peer -> a hostile answer instead
        self.asked: list[str] = []
        self.heartbeats: list[PeerProgress] = []

    def holds(self, peer: str, chain: Chain, tag: str) -> PeerProgress:
        self.chains[peer], self.states[peer] = chain, (tag, chain.tip_step)
        beat = PeerProgress(peer_id=peer, outer_step=chain.tip_step, state="training", time=time.time(),
                            digest=chain.tip_digest.hex()[:16])
        self.heartbeats.append(beat)
        return beat

    def fetch_lineage(self, peer_id, locator, timeout, max_bytes):
        self.asked.append(peer_id)
        if peer_id in self.proofs:
            return self.proofs[peer_id]
        chain = self.chains.get(peer_id)
        if chain is None:
            return None, "connection refused"
        start = find_start((chain.root_step, chain.root_digest), [c.digest for c in chain.certs], locator)
        certs = [c.encode() for c in chain.certs_after(start[0])] if start else []
        return {"root": [chain.root_step, chain.root_digest], "from": list(start) if start else None,
                "tip": [chain.tip_step, chain.tip_digest], "certs": certs}, None

    def download_state(self, peer_ids, timeout, max_bytes, parallel=1):
        peer = peer_ids[0]
        tag, step = self.states[peer]
        p = params(tag, step)
        meta, tensors = pack_state(p, [None] * len(p), step, MANIFEST, params_digest(p))
        return DownloadedState(peer, meta, tensors, 100, 0.01, (peer,)), []


def catch_up_for(mine: Chain, swarm: FakeSwarm, blamed: list, tag: str = "mine") -> CatchUp:
    return CatchUp(manifest=MANIFEST, transport=swarm, cfg=CFG, snapshot=lambda: mine, counts=everyone,
                   fetch=lambda: list(swarm.heartbeats), blame=lambda peer, why: blamed.append((peer, why)),
                   templates=params(tag, 0), download_sources=1, stop=threading.Event())


def test_a_lighter_lineage_is_checked_once_remembered_and_never_adopted() -> None:
    swarm, blamed = FakeSwarm(), []
    mine = grow(genesis(), 24, KEYS[:3], "swarm")
    beat = swarm.holds("loner", grow(genesis(), 60, KEYS[3:4], "loner"), "loner")
    catch_up = catch_up_for(mine, swarm, blamed)
    assert catch_up.check([beat]) is None and catch_up.check([beat]) is None
    assert swarm.asked == ["loner"] and not blamed


def test_a_heavier_lineage_is_proven_and_downloaded_before_the_loop_hears_of_it() -> None:
    swarm, blamed = FakeSwarm(), []
    mine = grow(genesis(), 60, KEYS[3:4], "loner")
    heavy = grow(genesis(), 24, KEYS[:3], "swarm")
    beats = [swarm.holds(f"s{i}", heavy, "swarm") for i in range(3)]
    pending = catch_up_for(mine, swarm, blamed).check(beats)
    assert pending is not None and pending.state.outer_step == 24 and not blamed
    assert pending.chain.tip_digest == heavy.tip_digest and pending.comparison.dropped_rounds == 60
    assert swarm.asked == ["s0"]  # one holder's proof is enough


def test_a_peer_behind_on_our_own_chain_is_not_asked_anything() -> None:
    swarm, blamed = FakeSwarm(), []
    mine = grow(genesis(), 6, KEYS[:3], "swarm")
    behind = swarm.holds("late", Chain(MANIFEST, 0, GENESIS_DIGEST, mine.certs[:2]), "swarm")
    assert catch_up_for(mine, swarm, blamed).check([behind]) is None and swarm.asked == [] and not blamed


def test_a_claim_of_a_huge_step_without_proof_excludes_its_author_but_a_dead_peer_is_not_blamed() -> None:
    swarm, blamed = FakeSwarm(), []
    mine = grow(genesis(), 6, KEYS[:3], "swarm")
    liar = PeerProgress(peer_id="liar", outer_step=1_000_000, state="training", time=time.time(), digest="f" * 16)
    swarm.heartbeats.append(liar)
    catch_up = catch_up_for(mine, swarm, blamed)

    def beat_on() -> list[PeerProgress]:  # the liar keeps heartbeating
        return [PeerProgress(peer_id="liar", outer_step=1_000_000, state="training", time=time.time(),
                             digest="f" * 16)]

    catch_up.fetch = beat_on
    assert catch_up.check([liar]) is None
    assert [p for p, _ in blamed] == ["liar"] and "served no proof" in blamed[0][1]

    blamed.clear()
    dead = PeerProgress(peer_id="dead", outer_step=7, state="training", time=time.time() - 1, digest="e" * 16)
    catch_up.fetch = lambda: [dead]  # no newer heartbeat: it died after its last one
    assert catch_up.check([dead]) is None and not blamed


def test_a_claim_its_own_proof_does_not_hold_excludes_its_author() -> None:
    swarm, blamed = FakeSwarm(), []
    mine = grow(genesis(), 6, KEYS[:3], "swarm")
    swarm.holds("liar", mine, "swarm")  # it serves the swarm's real chain ...
    lie = PeerProgress(peer_id="liar", outer_step=6, state="training", time=time.time(), digest="0123456789abcdef")
    swarm.heartbeats = [lie]  # ... while it claims the current step with a digest nobody serves
    other = grow(genesis(), 5, KEYS[:3], "swarm")
    assert catch_up_for(other, swarm, blamed).check([lie]) is None
    assert [p for p, _ in blamed] == ["liar"] and "without the claimed one" in blamed[0][1]


def test_an_invalid_proof_excludes_its_author_at_once() -> None:
    swarm, blamed = FakeSwarm(), []
    mine = grow(genesis(), 3, KEYS[:3], "swarm")
    forged = grow(mine, 1, KEYS[3:4], "forged")
    beat = swarm.holds("forger", forged, "forged")
    cert = forged.certs[-1]
    bad = Certificate(cert.header, ((0, bytes(64)),))  # a signature that does not verify
    swarm.proofs["forger"] = ({"root": [0, GENESIS_DIGEST], "from": [3, mine.tip_digest],
                               "tip": [4, cert.digest], "certs": [bad.encode()]}, None)
    assert catch_up_for(mine, swarm, blamed).check([beat]) is None
    assert [p for p, _ in blamed] == ["forger"] and "no valid member signature" in blamed[0][1]


def test_a_state_that_is_not_on_the_proven_lineage_is_not_adopted() -> None:
    swarm, blamed = FakeSwarm(), []
    mine = grow(genesis(), 2, KEYS[3:4], "loner")
    heavy = grow(genesis(), 4, KEYS[:3], "swarm")
    beat = swarm.holds("s0", heavy, "swarm")
    swarm.states["s0"] = ("elsewhere", 4)  # it serves parameters its certificates never led to
    assert catch_up_for(mine, swarm, blamed).check([beat]) is None


def test_the_heaviest_of_several_heavier_claims_is_the_one_prepared() -> None:
    swarm, blamed = FakeSwarm(), []
    two, three = grow(genesis(), 9, KEYS[:2], "two"), grow(genesis(), 3, KEYS[2:5], "three")
    beats = [swarm.holds("a0", two, "two"), swarm.holds("a1", two, "two"), swarm.holds("b0", three, "three")]
    pending = catch_up_for(genesis(), swarm, blamed).check(beats)  # a newcomer at genesis
    assert pending is not None and pending.chain.tip_digest == three.tip_digest


# ----- a real peer's own chain (a lone peer: its rounds never touch the network) ----------------------
def test_a_peer_certifies_every_round_it_commits_and_resumes_its_lineage(tmp_path) -> None:
    from conftest import tiny_config
    from swarmloco.app.peer import Peer, PeerOptions
    from test_cuda import LoneSwarm

    cfg = tiny_config(checkpoint={"dir": str(tmp_path)})
    swarm = LoneSwarm()
    peer = Peer(cfg, swarm, PeerOptions(device="cpu", max_outer_steps=3))
    genesis_digest = peer.diloco.chain.root_digest
    assert peer.run() == 3
    chain = peer.diloco.chain
    chain.verify()
    assert (chain.root_step, chain.root_digest, chain.tip_step) == (0, genesis_digest, 3)
    assert chain.tip_digest.hex() == peer.diloco.digest
    assert all(c.signers() == {swarm.identity.public_bytes} for c in chain.certs)
    assert [step for step, _ in peer.diloco.heartbeats.progress().attest] == [0, 1, 2]  # its signatures ride on heartbeats
    assert swarm.transport.lineage[:2] == (0, genesis_digest)  # and the averager serves the chain as proof

    again = Peer(cfg, LoneSwarm(), PeerOptions(device="cpu", resume=True, max_outer_steps=1))
    again.diloco.state.maybe_resume()
    assert again.outer_step == 3 and [c.encode() for c in again.diloco.chain.certs] == [c.encode() for c in chain.certs]
