"""Signed heartbeats and manifests, owned-run trust rules, tokens and exclusion (no network)."""

from __future__ import annotations

import time

import pytest

from swarmloco.config import config_from_dict, config_to_dict
from swarmloco.app.peer import run_manifest
from swarmloco.app.joining import JoinError, RunSpec, config_from_manifest, fetch_manifest, owned_config
from swarmloco.node.membership import AccessRefused, Membership
from swarmloco.protocol.access import issue_token, token_subkey
from swarmloco.protocol.identity import Identity
from swarmloco.protocol.manifest import ManifestMismatch, RunManifest, read_manifests, sign_manifest
from swarmloco.protocol.progress import MAX_SUSPECTS, PeerProgress, ProgressTracker
from swarmloco.protocol.records import encode_record
from swarmloco.protocol.interface import RoundOutcome

from conftest import tiny_config


class DictTransport:
    """The DHT as a dict (no validators: readers must check everything themselves)."""

    def __init__(self, identity: Identity, records: dict | None = None):
        self.identity, self.peer_id = identity, identity.libp2p_peer_id()
        self.records = records if records is not None else {}
        self.gates: list[tuple] = []

    def store(self, key, subkey, value, expiration_time):
        self.records.setdefault(key, {})[subkey] = value
        return True

    def get(self, key):
        return dict(self.records.get(key, {}))

    def set_gate(self, private, admitted, excluded):
        self.gates.append((private, admitted, excluded))


def beat(identity: Identity, **kw) -> PeerProgress:
    return PeerProgress(peer_id=identity.libp2p_peer_id(), outer_step=2, state="training", time=time.time(), **kw)


# ----- heartbeats -------------------------------------------------------------------------------
def test_signed_heartbeats_round_trip_and_forgeries_are_ignored() -> None:
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    records: dict = {}
    key = "sl_test_0123456789abcdef_progress"
    for who in (alice, bob):
        ProgressTracker(DictTransport(who, records), key, 10.0, who).publish(beat(who))
    reader = ProgressTracker(DictTransport(alice, records), key, 10.0, alice)
    assert [p.peer_id for p in reader.fetch()] == sorted([alice.libp2p_peer_id(), bob.libp2p_peer_id()])

    entries = records[key]
    now = time.time()
    # mallory signs a heartbeat that claims to be bob's, under her own subkey, and under bob's
    forged = encode_record("progress", beat(bob).to_dict(), mallory, now + 10, key=key)
    entries[mallory.public_hex] = forged
    entries[bob.public_hex] = forged
    # a genuine record of alice replayed under another run's key; an unsigned one; garbage
    other_key = "sl_other_0123456789abcdef_progress"
    entries["f" * 64] = encode_record("progress", beat(alice).to_dict(), alice, now + 10, key=other_key)
    entries["e" * 64] = b"\x81\xa1v\x01"
    entries["d" * 64] = b"\xff" * 100
    # an expired record of alice, stored under her subkey
    stale = dict(entries)
    stale[alice.public_hex] = encode_record("progress", beat(alice).to_dict(), alice, now - 1, key=key)
    fresh = lambda: ProgressTracker(DictTransport(alice, records), key, 10.0, alice)  # noqa: E731 - a first read
    assert [p.peer_id for p in fresh().fetch()] == [alice.libp2p_peer_id()]  # bob's slot holds a forgery now
    records[key] = stale
    assert fresh().fetch() == []


def test_a_heartbeats_suspects_round_trip_and_too_many_or_mistyped_ones_void_it() -> None:
    alice = Identity.generate()
    body = beat(alice, attempt=1, rerun="broken", suspects=("12D3KooWdead",)).to_dict()
    assert PeerProgress.from_body(body).suspects == ("12D3KooWdead",)
    assert PeerProgress.from_body({k: v for k, v in body.items() if k != "suspects"}).suspects == ()  # optional
    for bad in (["p"] * (MAX_SUSPECTS + 1), [7], "12D3KooWdead", ["x" * 10_000]):
        assert PeerProgress.from_body({**body, "suspects": bad}) is None, bad


def test_a_heartbeat_read_once_counts_until_its_ttl_even_if_a_later_read_misses_it() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    records: dict = {}
    key = "sl_test_0123456789abcdef_progress"
    now = [time.time()]
    ProgressTracker(DictTransport(bob, records), key, 10.0, bob).publish(beat(bob))
    reader = ProgressTracker(DictTransport(alice, records), key, 10.0, alice, clock=lambda: now[0])
    assert [p.peer_id for p in reader.fetch()] == [bob.libp2p_peer_id()]
    saved, records[key] = records[key], {}  # a DHT read that comes back short
    now[0] += 5
    assert [p.peer_id for p in reader.fetch()] == [bob.libp2p_peer_id()]  # not an empty swarm
    now[0] += 6
    assert reader.fetch() == []  # bob's heartbeat is older than the ttl: gone
    records[key] = saved
    assert reader.fetch() == []  # (and an old record read again does not bring it back)


def test_a_private_tracker_counts_admitted_authors_only() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    records: dict = {}
    key = "sl_test_0123456789abcdef_progress"
    for who in (alice, bob):
        ProgressTracker(DictTransport(who, records), key, 10.0, who).publish(beat(who))
    reader = ProgressTracker(DictTransport(alice, records), key, 10.0, alice, admits=lambda k: k == alice.public_bytes)
    assert [p.peer_id for p in reader.fetch()] == [alice.libp2p_peer_id()]


# ----- owned runs -------------------------------------------------------------------------------
def owned(owner: Identity, **sections) -> RunManifest:
    return run_manifest(owned_config(tiny_config(**sections), owner))


def test_join_accepts_only_a_manifest_signed_by_the_owner_it_names() -> None:
    owner, mallory = Identity.generate(), Identity.generate()
    genuine = owned(owner)
    values = {owner.public_hex: sign_manifest(genuine, owner, time.time() + 60)}
    get = lambda key: values  # noqa: E731
    assert fetch_manifest(get, RunSpec("test"), timeout=0).manifest.hash == genuine.hash
    # mallory signs the genuine manifest (it names the owner, not her): not by its owner, ignored
    values[mallory.public_hex] = sign_manifest(genuine, mallory, time.time() + 60)
    assert fetch_manifest(get, RunSpec("test"), timeout=0).author == owner.public_bytes
    # mallory claims the run with her own manifest: two owners; pinning decides
    values[mallory.public_hex] = sign_manifest(owned(mallory), mallory, time.time() + 60)
    with pytest.raises(JoinError, match="several owners"):
        fetch_manifest(get, RunSpec("test"), timeout=0)
    assert fetch_manifest(get, RunSpec("test", owner.public_bytes), timeout=0).manifest.hash == genuine.hash
    # a wrong owner pinned: nothing acceptable
    with pytest.raises(JoinError, match="no manifest"):
        fetch_manifest(get, RunSpec("test", Identity.generate().public_bytes), timeout=0)
    # an expired manifest, or a tampered one, is nothing
    values = {owner.public_hex: sign_manifest(genuine, owner, time.time() - 1)}
    with pytest.raises(JoinError, match="no manifest"):
        fetch_manifest(get, RunSpec("test"), timeout=0)
    tampered = sign_manifest(genuine, owner, time.time() + 60).replace(b"\xa4test", b"\xa4tesu")
    assert read_manifests({owner.public_hex: tampered}, "test", time.time()) == []


def test_join_builds_the_owners_config_and_refuses_local_file_reads() -> None:
    owner = Identity.generate()
    manifest = owned(owner)
    signed = read_manifests({owner.public_hex: sign_manifest(manifest, owner, time.time() + 60)}, "test",
                            time.time())[0]
    local = config_from_dict({"swarm": {"min_peers": 3}})
    cfg = config_from_manifest(signed, local)
    assert run_manifest(cfg).hash == manifest.hash and cfg.swarm.min_peers == 3
    reads_files = owned(owner, data={"path": "/home/volunteer/.ssh"})
    signed = read_manifests({owner.public_hex: sign_manifest(reads_files, owner, time.time() + 60)}, "test",
                            time.time())[0]
    with pytest.raises(JoinError, match="trust-data-path"):
        config_from_manifest(signed, local)
    with pytest.raises(JoinError, match="access.owner"):
        owned_config(config_from_dict({**config_to_dict(tiny_config()), "access": {"owner": "ab" * 32}}), owner)
    assert RunSpec.parse(f"run-1@{owner.public_hex}") == RunSpec("run-1", owner.public_bytes)
    for bad in ("", "a b", "x@zz", "x@" + "ab" * 31):
        with pytest.raises(JoinError):
            RunSpec.parse(bad)


# ----- membership -------------------------------------------------------------------------------
def member(owner: Identity | None, me: Identity, records: dict, private: bool = False, **swarm):
    cfg = owned_config(tiny_config(access={"private": private}, swarm=swarm), owner) if owner else tiny_config(swarm=swarm)
    return Membership(run_manifest(cfg), DictTransport(me, records), me, cfg.swarm)


def test_a_peer_with_another_manifest_is_refused_with_the_differing_fields() -> None:
    owner = Identity.generate()
    records: dict = {}
    records.setdefault("sl_test_manifest", {})[owner.public_hex] = sign_manifest(owned(owner), owner, time.time() + 60)
    member(owner, Identity.generate(), records).announce()  # same manifest: fine, re-published
    other = owned_config(tiny_config(inner={"steps": 9}), owner)
    stranger = Membership(run_manifest(other), DictTransport(Identity.generate(), records),
                          Identity.generate(), other.swarm)
    with pytest.raises(ManifestMismatch, match="inner.steps"):
        stranger.announce()


def test_a_private_run_admits_token_holders_until_their_token_expires() -> None:
    owner, alice, bob = Identity.generate(), Identity.generate(), Identity.generate()
    records: dict = {}
    m = member(owner, alice, records, private=True)
    with pytest.raises(AccessRefused, match="no valid access token"):
        m.announce()
    key = m.manifest.tokens_key
    records[key] = {token_subkey(owner.public_bytes, alice.public_bytes):
                    issue_token(owner, alice.public_bytes, "test", time.time() + 60)}
    m.announce()
    assert m.admits(alice.public_bytes) and m.admits(owner.public_bytes) and not m.admits(bob.public_bytes)
    private, admitted, _ = m.transport.gates[-1]
    assert private and admitted == {alice.public_bytes, owner.public_bytes}
    # bob's token: expired; one for bob under alice's slot; one signed by bob himself: none count
    records[key][token_subkey(owner.public_bytes, bob.public_bytes)] = issue_token(
        owner, bob.public_bytes, "test", time.time() - 1)
    records[key][token_subkey(bob.public_bytes, bob.public_bytes)] = issue_token(
        bob, bob.public_bytes, "test", time.time() + 60)
    m.refresh()
    assert not m.admits(bob.public_bytes)
    records[key][token_subkey(owner.public_bytes, alice.public_bytes)] = issue_token(
        owner, alice.public_bytes, "test", time.time() - 1)  # alice's token lapses
    assert not m.refresh_tokens() and not m.admits(alice.public_bytes)


def test_invalid_data_excludes_at_once_and_clipping_twice_in_a_row_too() -> None:
    me, x, y = Identity.generate(), "12D3KooWx", "12D3KooWy"
    m = member(None, me, {}, exclude_rounds=5)
    m.note_round(RoundOutcome(ok=False, error="bad", rejected=(x,)), outer_step=3)
    assert m.refused(x, 3) and m.refused(x, 7) and not m.refused(x, 8)  # welcome again after 5 steps
    m.note_round(RoundOutcome(ok=True, clipped=(y,)), outer_step=10)
    assert not m.refused(y, 11)
    m.note_round(RoundOutcome(ok=True, clipped=(y,)), outer_step=12)  # not in a row
    assert not m.refused(y, 13)
    m.note_round(RoundOutcome(ok=True, clipped=(y,)), outer_step=13)
    assert m.refused(y, 14)
    assert m.transport.gates[-1][2] == frozenset({y})
    m.note_round(RoundOutcome(ok=True, clipped=(me.libp2p_peer_id(),), rejected=(me.libp2p_peer_id(),)), 14)
    assert not m.refused(me.libp2p_peer_id(), 15)  # a peer never excludes itself
    off = member(None, me, {}, exclude_rounds=0)
    off.note_round(RoundOutcome(ok=False, rejected=(x,)), outer_step=1)
    assert not off.refused(x, 2)


def test_a_peer_that_alone_times_out_twice_in_a_row_is_excluded_but_not_one_slowed_by_a_death() -> None:
    me, staller, slowed, dead = Identity.generate(), "12D3KooWs", "12D3KooWl", "12D3KooWd"
    m = member(None, me, {}, exclude_rounds=5)
    m.note_round(RoundOutcome(ok=False, slow=(slowed,), suspects=(dead,)), outer_step=1)  # explained by a death
    m.note_round(RoundOutcome(ok=False, slow=(slowed,), suspects=(dead,)), outer_step=1)
    assert not m.refused(slowed, 2)
    m.note_round(RoundOutcome(ok=False, slow=(staller,)), outer_step=2)
    m.note_round(RoundOutcome(ok=True, gathered={staller: {}, me.libp2p_peer_id(): {}}), outer_step=2)  # answered
    m.note_round(RoundOutcome(ok=False, slow=(staller,)), outer_step=3)
    assert not m.refused(staller, 3)
    m.note_round(RoundOutcome(ok=False, slow=(staller,)), outer_step=3)  # the re-run: twice in a row
    assert m.refused(staller, 4)
