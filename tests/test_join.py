"""Owned runs end to end: init-run publishes a signed manifest, join builds peers from it, tokens gate it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarmloco.protocol.identity import Identity
from swarmloco.protocol.records import encode_record

LOOPBACK = ("--host-maddrs", "/ip4/127.0.0.1/tcp/0")


def keyfile(tmp_path: Path, name: str) -> tuple[Identity, str]:
    identity = Identity.generate()
    path = tmp_path / f"{name}.key"
    identity.write_libp2p_key(path)
    return identity, str(path)


def start_owner(spawn, write_config, tmp_path: Path, **sections):
    owner, owner_key = keyfile(tmp_path, "owner")
    init = spawn("owner", write_config(**sections), "--identity", owner_key, *LOOPBACK, command="init-run")
    return owner, owner_key, init.maddrs()[0]


def join(spawn, name: str, maddr: str, *args: str, env: dict[str, str] | None = None):
    return spawn(name, None, maddr, *args, *LOOPBACK, command="join", env=env)


@pytest.mark.slow
def test_peers_join_an_owned_run_with_no_config_file_and_train_together(spawn, write_config, tmp_path) -> None:
    owner, _, maddr = start_owner(spawn, write_config, tmp_path)
    paced = {"SWARMLOCO_FAULT": "slow_steps:0.1"}  # rounds of ~1 s: the swarm still trains when `late` comes
    a = join(spawn, "a", maddr, "--min-peers", "2", env=paced)  # the swarm's only run: found
    b = join(spawn, "b", maddr, f"test@{owner.public_hex}", "--min-peers", "2", env=paced)
    rounds_a = [a.next_round() for _ in range(2)]
    late = join(spawn, "late", maddr, "--max-outer-steps", "2")  # joins a swarm that is already training
    rounds_late = [late.next_round() for _ in range(2)]
    rounds_a += [a.next_round() for _ in range(2)]
    while rounds_a[-1]["outer_step"] < rounds_late[-1]["outer_step"]:
        rounds_a.append(a.next_round())
    rounds_b = [b.next_round() for _ in range(len(rounds_a) - 1)]
    assert all(r["ok"] for r in rounds_a + rounds_b + rounds_late)
    assert any(r["peers"] >= 2 for r in rounds_a)  # they found each other through the owner's node
    assert rounds_late[0]["outer_step"] > 2  # it started from the swarm's downloaded state, not from scratch
    digests = {r["outer_step"]: r["digest"] for r in rounds_a}
    common = [r for r in rounds_b + rounds_late if r["outer_step"] in digests]
    assert len(common) >= 4 and all(digests[r["outer_step"]] == r["digest"] for r in common)  # one model
    assert late.wait(60) == 0
    assert f"of owner {owner.public_hex}" in a.log_text() and "signature checked" in b.log_text()


@pytest.mark.slow
def test_a_join_pinned_to_another_owner_is_refused(spawn, write_config, tmp_path) -> None:
    _, _, maddr = start_owner(spawn, write_config, tmp_path)
    mallory = Identity.generate()
    p = join(spawn, "p", maddr, f"test@{mallory.public_hex}", "--manifest-timeout", "4")
    assert p.wait(90) == 3
    assert "no manifest of run 'test' signed by" in p.log_text()


@pytest.mark.slow
def test_a_private_run_admits_token_holders_only(spawn, write_config, tmp_path) -> None:
    owner, owner_key, maddr = start_owner(spawn, write_config, tmp_path, access={"private": True})
    members = [keyfile(tmp_path, f"member{i}") for i in range(2)]
    _, stranger_key = keyfile(tmp_path, "stranger")
    for member, _ in members:  # one by peer id, one by public key: both forms work
        peer = member.libp2p_peer_id() if member is members[0][0] else member.public_hex
        issued = subprocess.run([sys.executable, "-m", "swarmloco", "token", owner_key, "test", peer,
                                 "--initial-peers", maddr, *LOOPBACK], capture_output=True, text=True, timeout=90)
        assert issued.returncode == 0, issued.stderr
    ok = [join(spawn, f"member{i}", maddr, "--identity", key, "--min-peers", "2", "--max-outer-steps", "2")
          for i, (_, key) in enumerate(members)]
    refused = join(spawn, "stranger", maddr, "--identity", stranger_key)
    assert refused.wait(120) == 3
    assert "no valid access token" in refused.log_text()
    rounds = [p.next_round() for p in ok for _ in range(2)]
    assert all(r["ok"] for r in rounds) and any(r["peers"] == 2 for r in rounds)  # token holders average
    assert all(p.wait(60) == 0 for p in ok)


@pytest.mark.slow
def test_a_bootstrap_guarding_a_run_refuses_records_its_peers_would(spawn, tmp_path) -> None:
    import hivemind

    from swarmloco.protocol.manifest import RunManifest, sign_manifest

    owner, mallory = Identity.generate(), Identity.generate()
    boot = spawn("boot", None, "--run", f"test@{owner.public_hex}", *LOOPBACK, command="bootstrap")
    client = hivemind.DHT(start=True, initial_peers=boot.maddrs(), client_mode=True)
    try:
        manifest = RunManifest.from_dict({"run_id": "test", "access": {"owner": owner.public_hex}})
        claimed = RunManifest.from_dict({"run_id": "test", "access": {"owner": mallory.public_hex}})
        exp = time.time() + 120

        def store(raw, author) -> bool:
            return bool(client.store(manifest.run_key, raw, exp, subkey=author.public_hex))

        assert not store(sign_manifest(claimed, mallory, exp), mallory)  # another owner claims the run
        assert store(sign_manifest(manifest, owner, exp), owner)
        deadline = time.monotonic() + 60  # the node then guards the run's heartbeats too (validator added)
        forged = encode_record("progress", {"peer_id": "x"}, mallory, exp, key=manifest.progress_key)
        while client.store(manifest.progress_key, forged, exp, subkey=owner.public_hex):
            assert time.monotonic() < deadline, "the bootstrap never started validating the run's heartbeats"
            time.sleep(1.0)
    finally:
        client.shutdown()
